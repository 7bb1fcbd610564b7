"""Per-generation, batch-first decoding state.

The slot buffer ``tokens``/``valid`` mirrors the KV cache one-to-one: slot ``j`` of row ``r`` holds
``tokens[r, j]`` and is attended to iff ``valid[r, j]``. After every step the valid slots of a row
are exactly its committed tokens minus the last one, ``last[r]``, which is the next step's first
input. Ragged acceptance across rows (speculation) leaves invalid slots ("holes") in the middle of
shorter rows; they are masked, never attended to, and trailing slots that are holes in every row are
dropped, so at batch 1 there are never holes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Proposal:
    """Tokens a drafter proposes for verification in one step.

    Attributes:
        tokens: ``[B, k]`` proposed token ids (rows with fewer proposals pad and set ``lengths``).
        probs: ``[B, k, V]`` the distributions the tokens were *sampled* from, or ``None`` for
            deterministic drafts (greedy drafts, prompt lookup): q is then one-hot.
        lengths: ``[B]`` how many proposals are real per row (``None``: all ``k``).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


@dataclass
class DecodeState:
    """Everything one generation knows, batch-first. Tensors live on ``device`` (the model's input
    device); per-token hooks receive this object and may read anything, but write only the fields
    their hook documents."""

    # --- fixed for the generation
    model: Any
    tokenizer: Any
    device: torch.device
    batch_size: int
    vocab_size: int
    prompt_ids: list[list[int]]           # unpadded prompt token ids per row
    prompt_lengths: torch.Tensor          # [B]
    seeds: torch.Tensor                   # [B] int64, one seed per row (decodekit.rng)
    max_new_tokens: int
    eos_token_ids: torch.Tensor           # [E] ids that finish a row
    pad_token_id: int
    extras: dict[str, Any] = field(default_factory=dict)  # per-generation scratch for components

    # --- the slot buffer (mirrors the cache)
    tokens: torch.Tensor = None           # [B, S] token per slot
    valid: torch.Tensor = None            # [B, S] bool, slot holds a committed token
    last: torch.Tensor = None             # [B] the last committed token (next input)
    committed: torch.Tensor = None        # [B] committed tokens incl. prompt and ``last``

    # --- outputs
    out_tokens: torch.Tensor = None       # [B, capacity] new tokens per row
    n_new: torch.Tensor = None            # [B] new tokens committed per row
    finished: torch.Tensor = None         # [B] bool, a finished row never changes again

    # --- this step
    step: int = 0
    proposal: Proposal | None = None
    proposals: torch.Tensor = None        # [B, T-1] proposed tokens (empty when no drafter)
    scores: torch.Tensor = None           # [B, T, V] float32 scores being processed
    step_tokens: torch.Tensor = None      # [B, T] committed tokens of this step (first ``accepted``)
    accepted: torch.Tensor = None         # [B] tokens appended this step (0 for finished rows)
    rolled_back: torch.Tensor = None      # [B] tokens removed this step
    n_proposed: torch.Tensor = None       # [B] real proposals this step
    n_matched: torch.Tensor = None        # [B] proposals accepted this step
    _rollback: torch.Tensor | None = None

    # --- counters for stats
    forward_passes: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def n_slots(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_positions(self) -> int:
        """T: positions verified this step (1 + number of proposals)."""
        return 1 + self.proposals.shape[1]

    def slot_positions(self) -> torch.Tensor:
        """[B, S] position id of every slot (holes get 1, as transformers does for padding)."""
        pos = self.valid.long().cumsum(-1) - 1
        return pos.masked_fill_(~self.valid, 1)

    def committed_ids(self, with_last: bool = True) -> torch.Tensor:
        """[B, L] each row's committed tokens, left-padded with ``pad_token_id`` (holes squeezed
        out): the ``input_ids`` a transformers ``LogitsProcessor`` expects."""
        tokens, valid = self.tokens, self.valid
        if with_last:
            tokens = torch.cat([tokens, self.last[:, None]], 1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
        # A stable sort of the validity flags moves holes to the front and keeps token order.
        order = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices
        ids = tokens.gather(1, order)
        keep = valid.gather(1, order)
        width = int(valid.sum(1).max()) if valid.numel() else 0
        ids = ids.masked_fill(~keep, self.pad_token_id)
        return ids[:, ids.shape[1] - width:]

    def prefix_ids(self, t: int) -> torch.Tensor:
        """[B, L+t] the prefix that verify position ``t`` conditions on: committed + proposals[:t]."""
        return torch.cat([self.committed_ids(), self.proposals[:, :t]], 1)

    def new_token_ids(self) -> list[list[int]]:
        """New tokens per row as Python lists (a host sync: not for the per-token path)."""
        n = self.n_new.tolist()
        rows = self.out_tokens.tolist()
        return [row[:k] for row, k in zip(rows, n)]

    # ----------------------------------------------------------- rollback
    def request_rollback(self, counts: torch.Tensor) -> None:
        """Ask the host to un-commit ``counts[r]`` new tokens of row ``r`` (called from an accept
        hook). Requests from several components combine by maximum."""
        counts = counts.to(self.device, torch.long)
        self._rollback = counts if self._rollback is None else torch.maximum(self._rollback, counts)
