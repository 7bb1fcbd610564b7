"""Per-row parameters: a field holds one number for the whole batch or a list with one per row.

Validation happens twice: the range at construction (pydantic, the error names the field and the
allowed range), the list length in ``setup`` (the batch size is only known then).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Union

import torch
from pydantic import AfterValidator, ValidationInfo

from decodekit import DecodekitError


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    return f"{left}, {right}"


def _checker(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, hint: str):
    allowed = _interval(lo, hi, lo_open, hi_open)

    def check(value: Any, info: ValidationInfo) -> Any:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise ValueError(f"{info.field_name} is an empty list: give one number, or one per prompt")
        for x in values:
            bad = (
                math.isnan(x)
                or (lo is not None and (x <= lo if lo_open else x < lo))
                or (hi is not None and (x >= hi if hi_open else x > hi))
            )
            if bad:
                raise ValueError(f"{info.field_name} must be in {allowed}, got {x}{hint}")
        return value

    return AfterValidator(check)


def row_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False, hint: str = "") -> Any:
    """A float field (or one float per row) whose values lie in the given interval."""
    return Annotated[Union[float, list[float]], _checker(lo, hi, lo_open, hi_open, hint)]


def row_int(lo: int | None = None, hi: int | None = None, *, hint: str = "") -> Any:
    """An int field (or one int per row) in ``[lo, hi]``."""
    return Annotated[Union[int, list[int]], _checker(lo, hi, False, False, hint)]


def per_row(component: Any, field: str, state: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, 1, 1]`` tensor of a per-row field, broadcastable against scores ``[B, T, V]``.

    Called in ``setup`` (once per generation), so the list-to-tensor copy never runs per token.
    """
    value = getattr(component, field)
    B = state.batch_size
    if isinstance(value, list):
        if len(value) != B:
            raise DecodekitError(
                f"{type(component).__name__}.{field} has {len(value)} values for a batch of {B} prompts: "
                f"give one value per prompt, or a single number for all"
            )
    else:
        value = [value] * B
    return torch.tensor(value, dtype=dtype, device=state.device).view(B, 1, 1)


def positions(state: Any) -> torch.Tensor:
    """``[B, T]`` sequence position of every verified position (the key of ``decodekit.rng``)."""
    return state.committed[:, None] + torch.arange(state.num_positions, device=state.device)
