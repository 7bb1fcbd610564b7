"""Counter-based random numbers: one stream per row, keyed by (seed, position, salt).

A row's randomness at sequence position ``n`` is a pure function of its seed and ``n``, so:

* a row's output does not depend on which other prompts share its batch,
* nothing has to be rolled back after rejected speculation (a re-sampled position redraws
  the very same numbers),
* sampling needs no ``torch.Generator`` per row (no Python loop over rows) and no host sync.

The mixer is splitmix64 (Steele et al., "Fast splittable pseudorandom number generators", 2014)
written with int64 tensor ops; int64 multiplication wraps modulo 2**64 in torch on CPU and CUDA.
"""

from __future__ import annotations

import torch

# Salts: independent streams for the different uses of randomness at one position.
SAMPLE, ACCEPT, RESIDUAL, DRAFT = 0x5A, 0xAC, 0x7E, 0xD7


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    # Logical shift right: torch's >> on int64 is arithmetic, so mask the sign extension away.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def uniform(seeds: torch.Tensor, positions: torch.Tensor, salt: int, width: int | None = None) -> torch.Tensor:
    """Uniform floats in (0, 1).

    Args:
        seeds: ``[B]`` int64 seeds, one per row.
        positions: ``[B, T]`` int64 sequence positions being sampled.
        salt: which stream (``SAMPLE``, ``ACCEPT``, ...).
        width: ``None`` for one number per position (``[B, T]``), else ``V`` numbers per position
            (``[B, T, V]``).
    """
    key = _mix(seeds[:, None].long() * _GOLDEN + positions.long())
    key = _mix(key ^ _i64((salt * 0x94D049BB133111EB) % (1 << 64)))
    if width is not None:
        # key + i, then the mixer: a plain index offset (not i * constant), because torch.compile's
        # Triton codegen folds arange arithmetic into int32 index math, where a 64-bit constant
        # overflows ("Scalar ... is out of range for type int32", seen on an H200).
        key = key[..., None] + torch.arange(1, width + 1, device=key.device)
    bits = _lsr(_mix(key), 40).float()  # 24 random bits: exact in float32
    return (bits + 0.5) * (1.0 / (1 << 24))


def sample(scores: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, salt: int = SAMPLE) -> torch.Tensor:
    """Sample from ``softmax(scores)`` per position with no host sync: the Gumbel-max trick,
    ``argmax(scores - log(-log u))`` (Gumbel 1954; Maddison et al. 2014).

    Args:
        scores: ``[B, T, V]`` unnormalised log-probabilities (``-inf`` never wins).
        seeds: ``[B]``; positions: ``[B, T]``.
    Returns: ``[B, T]`` int64 token ids.
    """
    u = uniform(seeds, positions, salt, scores.shape[-1]).to(scores.device)
    gumbel = -torch.log(-torch.log(u))
    return (scores.float() + gumbel).argmax(-1)


def sample_probs(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, salt: int) -> torch.Tensor:
    """Like :func:`sample` for (possibly unnormalised) probabilities ``[B, T, V]``."""
    return sample(torch.log(probs.float()), seeds, positions, salt)
