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

    # --- the slot buffer (mirrors the cache); ``tokens`` [B, S] and ``valid`` [B, S] (bool, the
    # slot holds a committed token) are properties below
    last: torch.Tensor = None             # [B] the last committed token (next input)
    committed: torch.Tensor = None        # [B] committed tokens incl. prompt and ``last``
    #: No live row has a hole or left padding (equal-length prompts, and speculation or rollback
    #: only at batch 1, where trailing holes are trimmed): a cache may then skip the attention
    #: mask of a one-query forward. A host flag, kept by the loop; False is always safe.
    dense: bool = False

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
    # Slot buffer storage. Either explicit tensors (``_tok``/``_val``, whatever was assigned) or,
    # once appended to, the first ``_S`` columns of the preallocated ``_slot_buf``: a plain step
    # then only writes one column and bumps ``_S``, and the prefix views are made when someone
    # reads ``tokens``/``valid`` (on a small model every op per token counts).
    _tok: torch.Tensor | None = field(default=None, repr=False)
    _val: torch.Tensor | None = field(default=None, repr=False)
    _S: int = field(default=-1, repr=False)          # -1: explicit tensors; else the buffer's width in use
    _slot_buf: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _views: tuple[int, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    # --- counters for stats
    forward_passes: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def tokens(self) -> torch.Tensor:
        """[B, S] the token of every slot."""
        return self._tok if self._S < 0 else self._buffer_views()[0]

    @tokens.setter
    def tokens(self, value: torch.Tensor) -> None:
        self._explicit()
        self._tok = value

    @property
    def valid(self) -> torch.Tensor:
        """[B, S] bool: the slot holds a committed token (False: a hole or left padding)."""
        return self._val if self._S < 0 else self._buffer_views()[1]

    @valid.setter
    def valid(self, value: torch.Tensor) -> None:
        self._explicit()
        self._val = value

    @property
    def n_slots(self) -> int:
        return self._S if self._S >= 0 else self._tok.shape[1]

    def _buffer_views(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        views = self._views
        if views is None or views[0] != self._S:
            buf, S = self._slot_buf, self._S
            views = self._views = (S, buf[0].narrow(1, 0, S), buf[1].narrow(1, 0, S))
        return views[1], views[2]

    def _explicit(self) -> None:
        """Switch to explicit tensors (someone assigns ``tokens`` or ``valid``)."""
        if self._S >= 0:
            self._tok, self._val = self._buffer_views()
            self._S = -1

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

    def append_slots(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Append ``[B, T]`` slots to the slot buffer.

        The buffer is preallocated and ``tokens``/``valid`` are its first ``S`` columns, so a step
        costs two small copies instead of re-concatenating the whole history (the host overhead
        per token is what matters on small models). Whoever assigns ``tokens``/``valid`` other
        tensors (compaction, rollback, trimming) is fine: the next append copies them in once,
        or adopts them without a copy when they are a prefix of the buffer.
        """
        T = tokens.shape[1]
        S = self._adopt(T)
        buf = self._slot_buf
        buf[0][:, S:S + T].copy_(tokens)
        buf[1][:, S:S + T].copy_(valid)
        self._S = S + T

    def _adopt(self, T: int) -> int:
        """Make the buffer hold the current slots with room for ``T`` more; returns ``S``."""
        buf, S = self._slot_buf, self._S
        if S >= 0 and S + T <= buf[0].shape[1]:
            return S
        if S < 0:
            tok, val = self._tok, self._val
            S = tok.shape[1]
            if buf is not None and S + T <= buf[0].shape[1] and _is_prefix(tok, buf[0]) and _is_prefix(val, buf[1]):
                self._S = S  # a trimmed prefix of the buffer: nothing to copy
                return S
        else:
            tok, val = self._buffer_views()
        cap = max(2 * (S + T), S + self.max_new_tokens + 2 * T)
        new = (tok.new_empty(self.batch_size, cap), val.new_zeros(self.batch_size, cap))
        new[0][:, :S].copy_(tok)
        new[1][:, :S].copy_(val)
        self._slot_buf, self._S, self._views = new, S, None
        return S

    def append_slot(self, token: torch.Tensor, finished: torch.Tensor | None) -> torch.Tensor:
        """One slot per row (plain decoding's step): ``token`` [B], valid where not ``finished``
        [B] (``None``: every row). Returns the new slot's validity [B] (a view; read it before
        the next append)."""
        S = self._adopt(1)
        buf = self._slot_buf
        buf[0].select(1, S).copy_(token)
        ok = buf[1].select(1, S)
        if finished is None:
            ok.fill_(True)
        else:
            torch.logical_not(finished, out=ok)
        self._S = S + 1
        return ok

    def truncate_slots(self, keep: int) -> None:
        """Drop every slot from ``keep`` on (trailing holes)."""
        if self._S >= 0:
            self._S = min(self._S, keep)
        else:
            self._tok, self._val = self._tok[:, :keep], self._val[:, :keep]

    # ----------------------------------------------------------- rollback
    def request_rollback(self, counts: torch.Tensor) -> None:
        """Ask the host to un-commit ``counts[r]`` new tokens of row ``r`` (called from an accept
        hook). Requests from several components combine by maximum."""
        counts = counts.to(self.device, torch.long)
        self._rollback = counts if self._rollback is None else torch.maximum(self._rollback, counts)


def _is_prefix(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """``view`` is ``buf[:, :n]`` for some n (same storage start and strides)."""
    return view.data_ptr() == buf.data_ptr() and view.stride() == buf.stride() and view.shape[0] == buf.shape[0]
