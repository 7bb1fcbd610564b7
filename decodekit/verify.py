"""Selection and speculative verification, vectorised over rows and positions, no host sync.

Rules (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023):

* deterministic drafts (q one-hot) or a deterministic sampler: the target picks ``y_t`` at every
  position; proposals are accepted while ``y_t == x_t``; the next token is ``y`` at the first
  mismatch (or the bonus position). With sampling this is exact: ``y ~ p`` given ``y != x`` is the
  residual ``norm(max(0, p - onehot(x)))``.
* sampled drafts with distributions q: accept ``x_t`` iff ``u_t < p_t(x_t) / q_t(x_t)``; at the
  first rejection sample ``norm(max(0, p_t - q_t))``; if all are accepted take the bonus ``y_k ~ p_k``.
"""

from __future__ import annotations

import torch

from decodekit import rng
from decodekit.state import DecodeState, Proposal


def verify(
    state: DecodeState,
    target: torch.Tensor,
    probs: torch.Tensor | None,
    proposal: Proposal | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide per row how many proposals are accepted and which token comes next.

    Args:
        target: ``[B, T]`` the sampler's pick at each position.
        probs: ``[B, T, V]`` the distributions sampled from (``None``: deterministic sampler).
        proposal: this step's proposal (``None``: nothing proposed).
    Returns:
        ``(n_matched [B], next_token [B])``: accepted proposals and the token after them.
    """
    B, T = target.shape
    if proposal is None or T == 1:
        return torch.zeros(B, dtype=torch.long, device=target.device), target[:, 0]
    drafts = state.proposals  # [B, k]
    k = T - 1
    t = torch.arange(k, device=target.device)
    real = t[None] < state.n_proposed[:, None]  # [B, k]
    if proposal.probs is None or probs is None:
        ok = (target[:, :k] == drafts) & real
        n = ok.long().cumprod(1).sum(1)
        return n, target.gather(1, n[:, None])[:, 0]

    q = proposal.probs.to(probs.device).float()  # [B, k, V]
    p = probs[:, :k].float()
    p_x = p.gather(2, drafts[..., None])[..., 0]
    q_x = q.gather(2, drafts[..., None])[..., 0]
    positions = state.committed[:, None] + t[None]
    u = rng.uniform(state.seeds, positions, rng.ACCEPT).to(p.device)
    ok = (u * q_x < p_x) & real
    n = ok.long().cumprod(1).sum(1)
    residual = (p - q).clamp_min_(0)
    # p == q on the support makes the residual empty; the rejection then has probability 0, but
    # keep the sampler well defined (falls back to p).
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p, residual)
    resampled = rng.sample_probs(residual, state.seeds, positions, rng.RESIDUAL)  # [B, k]
    rejected_at = torch.cat([resampled, target[:, k:]], 1)  # bonus at index k
    nxt = rejected_at.gather(1, n[:, None])[:, 0]
    # All real proposals accepted: the bonus comes from p at position n (the target's own pick).
    all_ok = n >= state.n_proposed
    nxt = torch.where(all_ok, target.gather(1, n[:, None])[:, 0], nxt)
    return n, nxt
