"""Mirostat v2 (Basu et al. 2021, "Mirostat: a neural text decoding algorithm that directly
controls perplexity", arXiv 2007.14966; the v2 update as in llama.cpp ``llama_sampler_mirostat_v2``).

Per row a target surprise ``tau`` and a running threshold ``mu`` (starts at 2 * tau): tokens whose
surprise ``-log2 p`` exceeds ``mu`` are dropped (the top token always stays); after a token x is
committed, ``mu -= eta * (-log2 p'(x) - tau)`` with p' the truncated, renormalised distribution.

Under speculation mu at verify position t depends on the proposals before t, so positions are
processed in order (a loop over T, never over rows). ``mu`` is kept per committed position, so a
rollback just reads an older value.
"""

from __future__ import annotations

import math

import torch

from decodekit import Processor
from decodekit.state import DecodeState
from decodekit_samplers._params import per_row, row_float

LN2 = math.log(2.0)


def mirostat_mask(logp: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` tokens to drop at one position: surprise above ``mu`` ``[B, 1]``, top kept."""
    drop = -logp / LN2 > mu
    return drop.scatter(-1, logp.argmax(-1, keepdim=True), False)


class Mirostat(Processor):
    """Mirostat v2: keep the text's surprise near ``tau`` bits by truncating the distribution at a
    learned threshold (learning rate ``eta``). Place it last, after temperature, and sample with
    ``Multinomial``: its feedback assumes the token is drawn from the distribution it leaves."""

    tau: row_float(0, None, lo_open=True) = 5.0
    eta: row_float(0, 1, lo_open=True) = 0.1

    def setup(self, state: DecodeState) -> None:
        B = state.batch_size
        self._tau = per_row(self, "tau", state)[:, :, 0]  # [B, 1]
        self._eta = per_row(self, "eta", state)[:, :, 0]
        # mu before new token j, j = 0 .. max_new_tokens; one spare column for masked writes.
        self._scratch = state.max_new_tokens + 1
        self._mu = (2 * self._tau).repeat(1, self._scratch + 1)  # [B, max_new + 2]

    def current_mu(self, state: DecodeState) -> torch.Tensor:
        """``[B, 1]`` mu before the next token of each row."""
        return self._mu.gather(1, state.n_new.clamp(max=self._scratch)[:, None])

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        scores = state.scores
        T = scores.shape[1]
        logp = torch.log_softmax(scores.float(), -1)  # [B, T, V]
        mu = self.current_mu(state)
        mus, drops, kept = [], [], []
        for t in range(T):  # positions in order: mu_t depends on the proposal at t - 1
            drop = mirostat_mask(logp[:, t], mu)
            lp = logp[:, t].masked_fill(drop, float("-inf"))
            lp = lp - torch.logsumexp(lp, -1, keepdim=True)
            mus.append(mu)
            drops.append(drop)
            kept.append(lp)
            if t < T - 1:
                surprise = -lp.gather(-1, state.proposals[:, t : t + 1]) / LN2
                mu = mu - self._eta * (surprise - self._tau)
        self._mus = torch.cat(mus, 1)  # [B, T]
        self._logp = torch.stack(kept, 1)  # [B, T, V] renormalised, for the feedback in accept
        return scores.masked_fill(torch.stack(drops, 1), float("-inf"))

    def accept(self, state: DecodeState) -> None:
        n = state.accepted  # [B]; 0 in the rollback call: mu is then read from history
        T = self._mus.shape[1]
        start = state.n_new - n  # new-token index of this step's first position
        t = torch.arange(T, device=n.device)
        last = (n - 1).clamp_min(0)[:, None]  # [B, 1]
        x = state.step_tokens.gather(1, last)
        lp = self._logp.gather(1, last[..., None].expand(-1, 1, self._logp.shape[-1]))[:, 0]  # [B, V]
        surprise = -lp.gather(1, x) / LN2
        mu_after = self._mus.gather(1, last) - self._eta * (surprise - self._tau)  # [B, 1]
        at = torch.where(t[None] < n[:, None], start[:, None] + t, self._scratch)
        self._mu.scatter_(1, at, self._mus)
        at = torch.where(n > 0, state.n_new, self._scratch)[:, None]
        self._mu.scatter_(1, at, mu_after)
