"""Stateful processors: the distribution at verify position t depends on the prefix
``committed + proposals[:, :t]``.

Each keeps its state for the committed prefix (token counts, or the token history) and extends it
per position inside ``process_logits`` without touching it; ``accept`` then folds in exactly what
was committed and removes what was rolled back. transformers' processors recompute from
``input_ids`` at every call and get no rollback notice (issues #32165, #34265); here the state is
incremental and follows the host.
"""

from __future__ import annotations

from typing import Union

import torch
from pydantic import Field

from decodekit import Processor
from decodekit.state import DecodeState
from decodekit_samplers._history import History
from decodekit_samplers._params import per_row, row_float

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- pure functions
def position_counts(counts: torch.Tensor, proposals: torch.Tensor, V: int) -> torch.Tensor:
    """``[B, T, V]`` token counts of every verify position's prefix: the committed ``counts``
    ``[B, V + 1]`` plus ``proposals[:, :t]`` for position t (one scatter, no loop)."""
    B, k = proposals.shape
    if k == 0:
        return counts[:, None, :V]
    t = torch.arange(k + 1, device=counts.device)
    before = (torch.arange(k, device=counts.device)[None] < t[:, None]).to(counts.dtype)  # [T, k]
    out = counts[:, None].repeat(1, k + 1, 1)  # [B, T, V + 1]
    out.scatter_add_(2, proposals.clamp(max=V)[:, None].expand(B, k + 1, k), before.expand(B, k + 1, k).contiguous())
    return out[..., :V]


def position_seen(seen: torch.Tensor, proposals: torch.Tensor, V: int) -> torch.Tensor:
    """:func:`position_counts` for presence only: ``[B, T, V]`` bool from the committed ``seen``
    ``[B, V + 1]`` (a quarter of the bytes of float counts, and no ``> 0`` pass)."""
    B, k = proposals.shape
    if k == 0:
        return seen[:, None, :V]
    t = torch.arange(k + 1, device=seen.device)
    before = torch.arange(k, device=seen.device)[None] < t[:, None]  # [T, k]
    idx = torch.where(before[None], proposals.clamp(max=V)[:, None, :], V)  # [B, T, k]; V: the spare column
    return seen[:, None].repeat(1, k + 1, 1).scatter_(2, idx, True)[..., :V]


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, arXiv 1909.05858) as transformers applies it: a seen
    token's score is divided by ``penalty`` if positive, multiplied if negative."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def presence_frequency(scores: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: ``score - frequency * count - presence * (count > 0)``."""
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def ngram_bans(ext: torch.Tensor, n_t: torch.Tensor, n: int, V: int) -> torch.Tensor:
    """``[B, T, V]`` bool: tokens that would repeat an n-gram of each position's prefix.

    Like transformers' ``NoRepeatNGramLogitsProcessor``: match the prefix's last n-1 tokens against
    every full window of the prefix; a matching window bans its last token.
    """
    B, L = ext.shape
    T = n_t.shape[1]
    if L < n:
        return torch.zeros(B, T, V, dtype=torch.bool, device=ext.device)
    windows = ext.unfold(1, n, 1)  # [B, W, n]
    W = windows.shape[1]
    idx = n_t[..., None] - (n - 1) + torch.arange(n - 1, device=ext.device)  # [B, T, n-1]
    suffix = ext.gather(1, idx.clamp_min(0).view(B, -1)).view(B, T, n - 1)
    match = (windows[:, None, :, :-1] == suffix[:, :, None, :]).all(-1)  # [B, T, W]
    # Only windows that lie wholly inside position t's prefix count.
    match &= torch.arange(W, device=ext.device)[None, None] + n <= n_t[..., None]
    banned = torch.zeros(B, T, V + 1, dtype=torch.bool, device=ext.device)
    last = windows[..., -1].clamp(max=V)[:, None].expand(B, T, W)
    banned.scatter_(2, torch.where(match, last, V), True)
    return banned[..., :V]


def dry_match_lengths(ext: torch.Tensor, n_t: torch.Tensor, breaker: torch.Tensor, V: int, max_len: int, last_n: int) -> torch.Tensor:
    """``[B, T, V]`` DRY repeat length per candidate token (0 = no repeat).

    For every earlier index i of position t's prefix ``s = ext[:n]`` (e = n - 1), the match length
    is the number of l = 0, 1, ... with ``s[i - l] == s[e - l]`` and ``s[e - l]`` not a sequence
    breaker, capped at ``max_len``; token ``s[i + 1]`` (not a breaker) would extend that repeat.
    Each token keeps its longest match (oobabooga text-generation-webui PR #5677, the reference
    DRY implementation by p-e-w). Vectorised as a [B, T, L, max_len] comparison + cumprod.
    """
    B, L = ext.shape
    T = n_t.shape[1]
    dev = ext.device
    l = torch.arange(max_len, device=dev)
    i = torch.arange(L, device=dev)
    e = n_t - 1  # [B, T]
    lo = (n_t - last_n).clamp_min(0) if last_n > 0 else torch.zeros_like(n_t)  # window start
    a_idx = i[:, None] - l[None]  # [L, W]
    a = ext[:, a_idx.clamp_min(0)]  # [B, L, W]
    b_idx = (e[..., None] - l).clamp_min(0)  # [B, T, W]
    b = ext.gather(1, b_idx.view(B, -1)).view(B, T, max_len)
    b_ok = ~breaker[b.clamp(max=V)]
    same = (a[:, None] == b[:, :, None]) & b_ok[:, :, None]  # [B, T, L, W]
    same &= a_idx[None, None] >= lo[..., None, None]
    length = same.long().cumprod(-1).sum(-1)  # [B, T, L]
    nxt = torch.cat([ext[:, 1:], ext[:, :1]], 1)  # [B, L] token after index i
    valid = (i[None, None] >= lo[..., None]) & (i[None, None] < e[..., None]) & ~breaker[nxt.clamp(max=V)][:, None]
    length = torch.where(valid, length, 0)
    best = torch.zeros(B, T, V + 1, dtype=torch.long, device=dev)
    best.scatter_reduce_(2, nxt.clamp(max=V)[:, None].expand(B, T, L), length, "amax")
    return best[..., :V]


# ----------------------------------------------------------------------------- components
def _width(n: int) -> int:
    """Columns of the token mirror: a power of two >= 64, so the compiled step sees few shapes."""
    return max(64, 1 << (n - 1).bit_length())


class _Counting(Processor):
    """Token counts ``[B, T, V]`` of every verify position's prefix, recomputed inside the step
    from the core's own record of new tokens (``state.out_tokens[:, :n_new]``) on top of the prompt's
    counts, which are counted once in ``setup``. Subclasses declare ``include_prompt`` after their
    main field, so a single positional value fills the main field.

    Why not counts kept up to date in ``accept`` (as before): that took ~20 eager ops per step
    (un-count the rolled-back tail, append, re-count) outside the CUDA graph, where each costs the
    host a kernel launch: at batch 1 on a GPU the host is what a step costs beyond the graph
    (issue #4). Now rollback needs no work at all (``n_new`` already went down), and ``accept`` at
    most one copy: when ``out_tokens``' width is not a power of two >= 64 it is mirrored into a
    buffer that is, so the compiled step sees few shapes (``out_tokens`` is exactly
    ``max_new_tokens + k + 1`` wide: read directly, every new length would recompile the step).
    """

    def setup(self, state: DecodeState) -> None:
        V = state.vocab_size
        self._V = V
        # The prompt's counts [B, V + 1]; the last column takes ids outside the vocabulary and
        # every masked-out write below.
        base = torch.zeros(state.batch_size, V + 1, dtype=torch.float32)
        if self.include_prompt:
            for r, prompt in enumerate(state.prompt_ids):  # once per generation, not per token
                if prompt:
                    ids = torch.tensor(prompt, dtype=torch.long).clamp(max=V)
                    base[r].scatter_add_(0, ids, torch.ones(len(prompt)))
        self._base = base.to(state.device)
        self._out: torch.Tensor | None = None  # [B, W] mirror of state.out_tokens (W >= its width)
        self._direct = False  # out_tokens' own width is a bucket: read it, no mirror
        self.accept(state)

    def _new_tokens(self, state: DecodeState) -> torch.Tensor | None:
        """``[B, W]`` the new tokens (valid below ``n_new``): ``out_tokens`` itself when its width is
        a bucket, else the mirror; ``None`` before there are any. Decided by a flag set in
        ``accept``: looking at ``out_tokens`` here would make the compiled step guard on its shape."""
        return state.out_tokens if self._direct else self._out

    def accept(self, state: DecodeState) -> None:
        """Mirror ``state.out_tokens`` (a host-side shape check, then one copy; nothing when its
        width is a bucket already). The mirror is reallocated only when outgrown."""
        out = state.out_tokens
        self._direct = out is not None and out.shape[1] == _width(out.shape[1])
        if out is None or self._direct:
            return
        if self._out is None or self._out.shape[1] < out.shape[1] or self._out.shape[0] != out.shape[0]:
            self._out = torch.zeros(out.shape[0], _width(out.shape[1]), dtype=torch.long, device=self._base.device)
        self._out[:, : out.shape[1]].copy_(out)

    def _committed_ids(self, state: DecodeState) -> torch.Tensor | None:
        """``[B, W]`` each row's committed new tokens, every other column pointing at the spare
        column V (never written, or rolled back: at or past ``n_new``); ``None`` before any."""
        out = self._new_tokens(state)
        if out is None or state.n_new is None:
            return None
        # The index is made here, not kept: inside the compiled step it folds into the kernel
        # instead of being one more graph input to copy per replay.
        j = torch.arange(out.shape[1], device=out.device)
        return torch.where(j[None] < state.n_new[:, None], out.clamp(max=self._V), self._V)

    def committed_counts(self, state: DecodeState) -> torch.Tensor:
        """``[B, V + 1]`` counts of each row's committed prefix (prompt if counted + new tokens)."""
        ids = self._committed_ids(state)
        if ids is None:
            return self._base
        return self._base.scatter_add(1, ids, torch.ones(ids.shape, dtype=self._base.dtype, device=ids.device))

    def counts(self, state: DecodeState) -> torch.Tensor:
        """``[B, T, V]`` counts per verify position."""
        return position_counts(self.committed_counts(state), state.proposals, self._V)


class RepetitionPenalty(_Counting):
    """transformers' ``repetition_penalty`` over the prompt and the generated tokens (per row
    allowed): seen tokens' scores are divided by it (multiplied when negative)."""

    repetition_penalty: row_float(0, None, lo_open=True) = 1.0
    include_prompt: bool = True

    def setup(self, state: DecodeState) -> None:
        super().setup(state)
        self._penalty = per_row(self, "repetition_penalty", state)
        self._seen = self._base > 0  # [B, V + 1] the prompt's tokens

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        # Presence is all this penalty needs: a bool scatter instead of float counts.
        ids = self._committed_ids(state)
        seen = self._seen if ids is None else self._seen.scatter(1, ids, True)
        return repetition_penalty(state.scores, position_seen(seen, state.proposals, self._V), self._penalty)


class PresencePenalty(_Counting):
    """Subtract ``presence_penalty`` from every token already generated (OpenAI / vLLM semantics:
    the prompt does not count unless ``include_prompt``); per row allowed."""

    presence_penalty: row_float(-2, 2) = 0.0
    include_prompt: bool = False

    def setup(self, state: DecodeState) -> None:
        super().setup(state)
        self._presence = per_row(self, "presence_penalty", state)
        self._zero = torch.zeros_like(self._presence)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return presence_frequency(state.scores, self.counts(state), self._presence, self._zero)


class FrequencyPenalty(_Counting):
    """Subtract ``frequency_penalty`` times a token's count so far (OpenAI / vLLM semantics:
    generated tokens only unless ``include_prompt``); per row allowed."""

    frequency_penalty: row_float(-2, 2) = 0.0
    include_prompt: bool = False

    def setup(self, state: DecodeState) -> None:
        super().setup(state)
        self._frequency = per_row(self, "frequency_penalty", state)
        self._zero = torch.zeros_like(self._frequency)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return presence_frequency(state.scores, self.counts(state), self._zero, self._frequency)


class NoRepeatNGram(Processor):
    """Ban every token that would repeat an n-gram of size ``no_repeat_ngram_size`` already in
    the sequence (prompt included, as in transformers)."""

    no_repeat_ngram_size: int = Field(3, ge=1)

    def setup(self, state: DecodeState) -> None:
        self._hist = History(state)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        ext, n_t = self._hist.extended(state)
        banned = ngram_bans(ext, n_t, self.no_repeat_ngram_size, state.scores.shape[-1])
        return state.scores.masked_fill(banned, NEG_INF)

    def accept(self, state: DecodeState) -> None:
        self._hist.accept(state)


class DRY(Processor):
    """"Don't Repeat Yourself" (p-e-w; llama.cpp ``dry_*``, text-generation-webui): a token that
    would extend a repeat of length m >= ``allowed_length`` gets ``multiplier * base ** (m -
    allowed_length)`` subtracted. Repeats do not run across ``sequence_breakers`` (strings are
    tokenized with the generation's tokenizer, as text-generation-webui does; ints are token ids).
    """

    multiplier: row_float(0) = 0.8
    base: float = Field(1.75, ge=1.0)
    allowed_length: int = Field(2, ge=1)
    sequence_breakers: list[Union[int, str]] = Field(default_factory=lambda: ["\n", ":", '"', "*"])
    penalty_last_n: int = Field(0, ge=0, description="only the last n tokens are searched; 0 = all")
    max_match_length: int = Field(50, ge=1, description="repeat lengths are capped here (text-generation-webui uses 50)")

    def setup(self, state: DecodeState) -> None:
        self._hist = History(state)
        self._multiplier = per_row(self, "multiplier", state)
        V = state.vocab_size
        breaker = torch.zeros(V + 1, dtype=torch.bool)
        for b in self.sequence_breakers:
            for t in self._token_ids(b, state):
                if 0 <= t < V:
                    breaker[t] = True
        self._breaker = breaker.to(state.device)

    @staticmethod
    def _token_ids(b: int | str, state: DecodeState) -> list[int]:
        if isinstance(b, int):
            return [b]
        # text-generation-webui: the breaker's token as it appears mid-text, i.e. the last token
        # of "a" + breaker (a leading-space-sensitive tokenizer would otherwise give another id).
        tok = state.tokenizer
        ids = tok.encode("a" + b, add_special_tokens=False)
        return ids[-1:] if ids else []

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        ext, n_t = self._hist.extended(state)
        V = state.scores.shape[-1]
        m = dry_match_lengths(ext, n_t, self._breaker, V, self.max_match_length, self.penalty_last_n)
        excess = (m - self.allowed_length).to(state.scores.dtype)
        penalty = torch.where(m >= self.allowed_length, self._multiplier * self.base ** excess, 0.0)
        return state.scores - penalty

    def accept(self, state: DecodeState) -> None:
        self._hist.accept(state)
