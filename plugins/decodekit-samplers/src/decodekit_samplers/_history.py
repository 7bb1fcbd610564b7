"""Each row's committed tokens, left-aligned and without holes, following accept/rollback.

The core's slot buffer has holes (ragged acceptance) and keeps the prompt right-aligned; the
sequence processors (n-gram bans, DRY, penalties) want "row r's text so far" as one contiguous
run. ``History`` keeps that run in ``ids [B, C]`` with lengths ``[B]``, updated in ``accept``
with vectorised scatters (no loop over rows, no host sync).
"""

from __future__ import annotations

import torch

from decodekit.state import DecodeState


class History:
    def __init__(self, state: DecodeState) -> None:
        B = state.batch_size
        P = max(len(p) for p in state.prompt_ids)
        self.capacity = P + state.max_new_tokens
        # One spare column at the end absorbs masked-out writes.
        ids = torch.zeros(B, self.capacity + 1, dtype=torch.long)
        for r, prompt in enumerate(state.prompt_ids):  # once per generation, not per token
            ids[r, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.ids = ids.to(state.device)
        self.length = state.prompt_lengths.to(state.device, torch.long).clone()  # [B]

    def removed(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, C], mask [B, C])``: the tokens this accept call un-commits (the last
        ``state.rolled_back[r]`` of row r)."""
        j = torch.arange(self.capacity, device=self.ids.device)
        start = (self.length - state.rolled_back)[:, None]
        return self.ids[:, : self.capacity], (j >= start) & (j < self.length[:, None])

    def accept(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the rollback, then append ``state.step_tokens[:, :accepted]``. Returns the
        appended ``(ids [B, T], mask [B, T])``."""
        self.length = self.length - state.rolled_back
        T = state.step_tokens.shape[1]
        j = torch.arange(T, device=self.ids.device)
        mask = j[None] < state.accepted[:, None]  # [B, T]
        where = torch.where(mask, self.length[:, None] + j, self.capacity)
        self.ids.scatter_(1, where, state.step_tokens)
        self.length = self.length + state.accepted
        return state.step_tokens, mask

    def extended(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's sequences: ``(ext [B, C + k], n [B, T])`` where the prefix of verify
        position t of row r is ``ext[r, :n[r, t]]`` (committed tokens + ``proposals[r, :t]``)."""
        B, k = state.proposals.shape
        ext = self.ids[:, : self.capacity]
        if k:
            ext = torch.cat([ext, torch.zeros(B, k, dtype=torch.long, device=ext.device)], 1)
            j = torch.arange(k, device=ext.device)
            ext = ext.scatter(1, self.length[:, None] + j, state.proposals)
        n = self.length[:, None] + torch.arange(k + 1, device=ext.device)
        return ext, n
