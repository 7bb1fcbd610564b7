"""Sampling from ``softmax(scores)`` with one counter-based stream per row (:mod:`decodekit.rng`).

The Gumbel-max trick ``argmax(scores + Gumbel noise)`` needs no ``torch.multinomial`` (which
syncs with the host on CUDA) and no ``torch.Generator`` per row: a row's noise at sequence position
n is a pure function of (row seed, n), so its output does not depend on its batch-mates and a
position verified again after a rejection redraws the very same numbers.
"""

from __future__ import annotations

import torch

from decodekit import Sampler, rng
from decodekit.state import DecodeState
from decodekit_samplers._params import positions


class Multinomial(Sampler):
    """Draw every verified position's token from the processed scores, seeded per row."""

    def sample(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = state.scores  # [B, T, V]
        tokens = rng.sample(scores, state.seeds, positions(state), rng.SAMPLE)  # [B, T]
        proposal = state.proposal
        if proposal is None or proposal.probs is None:
            # Deterministic (or no) drafts: "accept while the sample equals the draft" is exact
            # (decodekit.verify), so the distribution is not needed and softmax is skipped.
            return tokens, None
        return tokens, torch.softmax(scores.float(), -1)
