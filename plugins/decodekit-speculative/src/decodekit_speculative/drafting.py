"""What every model-based drafter shares: a draft network with its own KV cache that mirrors the
target's slot buffer, the autoregressive draft loop, and the adaptive draft exit of Draft & Verify.

The mirror works because the target's slot buffer is append-only within a step: the draft feeds
``last, x_1, ..., x_{k-1}`` into slots ``S, S+1, ...`` and the target's verify step writes exactly
``inputs = [last, x_1, ..., x_k]`` into the same slots (valid only up to what was committed). So the
draft cache stays correct if, before drafting, it is cut back to the slots the target still has
(``min(seen, state.n_slots)``) and masked with the target's own ``state.valid``: rejected drafts and
holes left by ragged acceptance are masked exactly as in the target.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from decodekit import rng
from decodekit.components import cache_kwarg, slot_attention_mask
from decodekit.state import DecodeState, Proposal


class DraftKV(DynamicCache):
    """A transformers ``DynamicCache`` with full (non-sliding) layers for a draft network.

    Layers whose attention the draft skips never receive keys; transformers asks layer 0 (or the
    first sliding layer) for the mask sizes, so such layers answer with a layer that is filled.
    Sliding-window models still get their window from the attention mask, and keeping all layers
    full makes rollback a plain slice (transformers' sliding layers drop what a rollback needs).
    """

    def __init__(self, skipped: frozenset[int] = frozenset(), n_layers: int = 0) -> None:
        super().__init__()
        self.skipped = skipped
        self.ref = next((i for i in range(n_layers) if i not in skipped), 0)

    def _layer(self, layer_idx: int) -> int:
        return self.ref if layer_idx in self.skipped else layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._layer(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._layer(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def keep(self, n: int) -> None:
        """Keep the first ``n`` slots of every layer (rollback is a slice, no copy)."""
        for layer in self.layers:
            if getattr(layer, "is_initialized", False) and layer.keys.shape[-2] > n:
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]


class DraftNet:
    """A draft network (a model, or the target with sublayers skipped) and its mirrored cache."""

    def __init__(self, model: Any, skipped_attention: frozenset[int] = frozenset(), n_layers: int = 0) -> None:
        self.model = model
        self.kv = DraftKV(skipped_attention, n_layers)
        self.seen = 0          # slots of the target's buffer (plus drafted ones) in ``kv``
        self.passes = 0        # draft forward passes (stats)
        self.device = model.get_input_embeddings().weight.device
        self.compactions: int | None = None  # the target cache's compaction count when last synced

    def sync(self, state: DecodeState) -> None:
        """Forget slots the target no longer has (rejected drafts, trimmed holes); after the target
        compacted its slots (decodekit-kvcache's StaticCache, ``stats["compactions"]``) every cached
        slot is at another index, so the draft starts over from the target's buffer."""
        compactions = int(state.extras.get("stats", {}).get("compactions", 0))
        if self.compactions is not None and compactions != self.compactions and self.seen:
            self.kv.keep(0)
            self.seen = 0
        self.compactions = compactions
        n = min(self.seen, state.n_slots)
        if n < self.seen:
            self.kv.keep(n)
            self.seen = n

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` ``[B, t]`` (new slots); ``positions`` and ``mask`` ``[B, seen + t]`` cover
        every slot. Returns the float32 logits of the last position, ``[B, V]``."""
        t = ids.shape[1]
        # the core's mask: sliding windows measured in positions when holes exist
        attn = slot_attention_mask(self.model, mask.to(self.device), positions.to(self.device), t)
        with torch.no_grad():  # drafts are never trained through
            out = self.model(
                input_ids=ids.to(self.device),
                position_ids=positions[:, -t:].to(self.device),
                attention_mask=attn,
                **{cache_kwarg(self.model): self.kv},
                use_cache=True,
                logits_to_keep=1,
            )
        self.seen += ids.shape[1]
        self.passes += 1
        return out.logits[:, -1].float()


class AdaptiveExit:
    """Draft & Verify's adaptive draft exit (Zhang et al. 2023, arXiv 2309.08168, Sec. 3.2),
    one threshold per row: stop drafting a row when the draft's top-1 probability < ``th``; after
    every step ``m <- b1*m + (1-b1)*matched/drafted``; ``th' = th+eps`` if ``m < alpha``, ``th`` if
    the row drafted the maximum, else ``th-eps``; ``th <- b2*th + (1-b2)*th'``."""

    def __init__(self, B: int, device: torch.device, th: float, beta1: float, alpha: float, eps: float, beta2: float) -> None:
        self.th = torch.full((B,), th, device=device)                     # [B]
        self.m = torch.full((B,), 1.0, device=device)                     # [B] smoothed acceptance
        self.beta1, self.alpha, self.eps, self.beta2 = beta1, alpha, eps, beta2

    def update(self, drafted: torch.Tensor, matched: torch.Tensor, k: int) -> None:
        live = drafted > 0  # a row that drafted nothing has no new evidence
        rate = matched.float() / drafted.clamp_min(1).float()
        m = self.beta1 * self.m + (1 - self.beta1) * rate
        up = m < self.alpha
        th_new = torch.where(up, self.th + self.eps, torch.where(drafted >= k, self.th, self.th - self.eps))
        th = (self.beta2 * self.th + (1 - self.beta2) * th_new).clamp(0.0, 1.0)
        self.m = torch.where(live, m, self.m)
        self.th = torch.where(live, th, self.th)


def _pick(state, logits, i, sample, temperature, exit, active):
    """One draft position: the token (sampled with the draft salt, or argmax), its distribution q
    (``None`` when greedy) and which rows keep drafting (D&V's adaptive exit: the draft's top-1
    probability must reach the threshold)."""
    if sample:
        scaled = logits / temperature
        x = rng.sample(scaled[:, None], state.seeds, (state.committed + i)[:, None], rng.DRAFT)[:, 0]  # [B]
        q = torch.softmax(scaled, -1)                                                               # [B, V]
    else:
        x, q = logits.argmax(-1), None
    if exit is not None:
        conf = (q if q is not None else torch.softmax(logits, -1)).amax(-1)
        active = active & (conf >= exit.th)
    return x, q, active


def draft(
    net: DraftNet,
    state: DecodeState,
    k: int,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    exit: AdaptiveExit | None = None,
) -> Proposal | None:
    """Propose up to ``k`` tokens per row with ``net``, autoregressively.

    Greedy drafts are deterministic (``probs=None``: verification compares with the target's pick);
    sampled drafts return the exact ``q`` they were drawn from (``[B, k, V]``), drawn with the
    counter-based RNG on the ``DRAFT`` stream at the position they would take.
    """
    B, dev = state.batch_size, state.device
    net.sync(state)
    seen = net.seen
    # The first draft pass catches up on committed slots the draft has not seen, plus ``last``.
    ids = torch.cat([state.tokens[:, seen:], state.last[:, None]], 1)                      # [B, t]
    pos = torch.cat([state.slot_positions(), (state.committed - 1)[:, None]], 1)              # [B, S+1]
    mask = torch.cat([state.valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)    # [B, S+1]
    # Drafting past max_new_tokens is wasted work: the loop would cut it anyway.
    room = (state.max_new_tokens - state.n_new - 1).clamp_min(0).masked_fill(state.finished, 0)  # [B]
    active = room > 0                                                                          # [B]
    if exit is None and not bool(active.any()):
        return None
    tokens, qs = [], []
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    for i in range(k):
        logits = net.forward(ids, pos, mask).to(dev)  # [B, V]
        x, q, active = _pick(state, logits, i, sample, temperature, exit, active & (i < room))
        if q is not None:
            qs.append(q)
        lengths = lengths + active.long()
        tokens.append(x)
        if i == k - 1 or (exit is not None and not bool(active.any())):
            break  # the adaptive exit's one host sync per draft token: it is what saves draft passes
        ids = x[:, None]
        pos = torch.cat([pos, (state.committed + i)[:, None]], 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
    width = len(tokens)
    if exit is not None:
        width = int(lengths.max())
        if width == 0:
            return None
    out = torch.stack(tokens, 1)[:, :width]                       # [B, k']
    probs = torch.stack(qs, 1)[:, :width] if sample else None     # [B, k', V]
    return Proposal(tokens=out, probs=probs, lengths=lengths)


def check_vocab(draft_model: Any, state: DecodeState, who: str) -> None:
    cfg = draft_model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    v = getattr(cfg, "vocab_size", None)
    if v is not None and int(v) != state.vocab_size:
        from decodekit.errors import DecodekitError

        raise DecodekitError(
            f"{who}: the draft model's vocabulary has {v} tokens, the target's {state.vocab_size}; "
            "speculative decoding compares token ids, so the draft must share the target's tokenizer "
            "(pick a smaller model of the same family)"
        )


def add_stats(state: DecodeState, **values: Any) -> None:
    state.extras.setdefault("stats", {}).update(values)


def draft_fixed(
    net: Any,
    state: DecodeState,
    k: int,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    exit: AdaptiveExit | None = None,
) -> Proposal:
    """:func:`draft` on a :class:`~decodekit_speculative.static_draft.StaticDraftNet`: always ``k``
    proposals wide (rows that stop early, or have no room, say so in ``lengths``), so the target's
    verify width ``1 + k`` never changes and its compiled graph is reused. No host sync except the
    adaptive exit's one per draft token (it is what saves draft passes)."""
    B, dev = state.batch_size, state.device
    room = (state.max_new_tokens - state.n_new - 1).clamp_min(0).masked_fill(state.finished, 0)  # [B]
    active = room > 0                                                                          # [B]
    tokens, qs = [], []
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    x = None
    for i in range(k):
        logits = (net.first(state) if i == 0 else net.next(state, x, i)).to(dev)  # [B, V]
        x, q, active = _pick(state, logits, i, sample, temperature, exit, active & (i < room))
        if q is not None:
            qs.append(q)
        lengths = lengths + active.long()
        tokens.append(x)
        if exit is not None and i < k - 1 and not bool(active.any()):
            break
    # pad to k: padded positions are never real (lengths), any finite q will do
    tokens += [tokens[-1]] * (k - len(tokens))
    probs = None
    if sample:
        qs += [qs[-1]] * (k - len(qs))
        probs = torch.stack(qs, 1)                                  # [B, k, V]
    return Proposal(tokens=torch.stack(tokens, 1), probs=probs, lengths=lengths)
