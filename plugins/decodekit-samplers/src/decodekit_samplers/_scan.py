"""A prefix sum over the vocabulary that compiles into the CUDA-graph decode step.

Why not ``x.cumsum(-1)``: with few rows (batch 1) and a long scan (a 49,152-token vocabulary),
Inductor lowers a cumsum to a *split scan* (``ir.SplitScan``, Triton's decoupled look-back scan
over several programs). It does so whenever the scan is longer than 8,192 and the rows fewer than
twice the SM count (``Reduction.num_splits`` -> ``InductorChoices.reduction_split_factor``: the
no-split threshold is 8,192 before sm_100, 524,288 from sm_100 on; a scan always may split,
``config.split_reductions`` does not apply to it). On an H200 with torch 2.11 that kernel failed in
Triton codegen, and the compiled step fell back to eager. No Inductor option turns the split off
for one graph only (``triton.min_split_scan_rblock`` only sizes the blocks).

So the scan is done in two levels, each short enough never to be split: reshape ``[..., V]`` into
``[..., C, chunk]`` (zero-padded at the end, which cannot change an earlier prefix), scan inside
the chunks, scan the C chunk totals, add each chunk's offset. Same result as one scan up to the
order of additions; accumulating in float64 makes it round to exactly what ATen's CPU cumsum of
float32 gives (it accumulates in double too), so the processors stay bit-identical to
transformers' on CPU. (ATen's CUDA cumsum accumulates in float32, so there transformers' own
result depends on its scan order; this one is the more accurate.)
"""

from __future__ import annotations

import torch

#: Chunk length of the two-level scan. Both levels must stay <= 8,192 (no split scan): chunks of
#: 1,024 cover vocabularies up to 8,388,608 tokens (Gemma 3: 262,144 -> 256 chunks).
SCAN_CHUNK = 1024
#: Longest scan Inductor keeps in one program on GPUs before sm_100.
NO_SPLIT_MAX = 8192


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 where the device has it (MPS has no float64); see the module docstring.
    return torch.float32 if x.device.type == "mps" else torch.float64


def vocab_cumsum(x: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """``x.cumsum(-1)`` that Inductor never turns into a split scan.

    Eager on CPU this *is* ``x.cumsum(-1)`` (ATen's, bit-identical to the two-level scan and ~7x
    faster there); everywhere else, and whenever it is being compiled, :func:`two_level_cumsum`.

    Args:
        x: ``[..., V]`` float tensor (probabilities over the vocabulary).
    Returns ``[..., V]`` in ``x.dtype``.
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return x.cumsum(-1)
    return two_level_cumsum(x, chunk)


def two_level_cumsum(x: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """The two-level scan: no scan longer than ``max(chunk, ceil(V / chunk))``."""
    V = x.shape[-1]
    acc = _acc_dtype(x)
    if V <= chunk:  # one chunk: a short scan already
        return x.to(acc).cumsum(-1).to(x.dtype)
    C = -(-V // chunk)
    if C > NO_SPLIT_MAX:
        raise ValueError(f"two_level_cumsum: a vocabulary of {V} needs {C} chunks of {chunk}; raise chunk so V / chunk <= {NO_SPLIT_MAX}")
    y = torch.nn.functional.pad(x.to(acc), (0, C * chunk - V)).unflatten(-1, (C, chunk))  # [..., C, chunk]
    inner = y.cumsum(-1)                                                                   # [..., C, chunk]
    totals = inner[..., -1]                                                                # [..., C]
    # Exclusive prefix of the totals, shifted by padding (not cumsum - totals, which rounds).
    offsets = torch.nn.functional.pad(totals.cumsum(-1)[..., :-1], (1, 0))                 # [..., C]
    out = (inner + offsets[..., None]).flatten(-2)                                         # [..., C * chunk]
    return out[..., :V].to(x.dtype)
