"""Prompt lookup decoding (Saxena 2023, github.com/apoorvumang/prompt-lookup-decoding): propose the
tokens that followed the latest earlier occurrence of the row's trailing n-gram, in the prompt or the
output so far. No draft model; deterministic drafts, so q is one-hot and greedy/sampling stay exact.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from pydantic import field_validator, model_validator

from decodekit.compiling import own_code
from decodekit.components import Drafter
from decodekit.state import DecodeState, Proposal


def _positive(name: str, v: int) -> int:
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def find_continuations(hist: torch.Tensor, length: torch.Tensor, ngram: int, min_ngram: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row, the tokens after the latest earlier match of its trailing n-gram.

    Longer n-grams win (they predict better); among matches of one size the latest wins (recent
    text is the best guide when the output repeats itself).

    Args:
        hist: ``[B, W]`` each row's committed tokens, left-aligned (``length[r]`` of them).
        length: ``[B]``.
    Returns:
        ``(tokens [B, k], n_tokens [B])``: the continuation and how much of it is real (0: no match).
    """
    B, W = hist.shape
    dev = hist.device
    start = torch.full((B,), -1, dtype=torch.long, device=dev)   # [B] continuation start, -1 = none
    for n in range(ngram, min_ngram - 1, -1):
        if W <= n:
            continue
        tail = hist.gather(1, (length[:, None] - n + torch.arange(n, device=dev)).clamp_min(0))  # [B, n]
        windows = hist.unfold(1, n, 1)                                                       # [B, W-n+1, n]
        j = torch.arange(windows.shape[1], device=dev)                                       # [W-n+1]
        # A match must be followed by at least one committed token, which also excludes the tail itself.
        ok = (windows == tail[:, None]).all(-1) & (j[None] + n < length[:, None]) & (length[:, None] > n)
        latest = torch.where(ok, j[None], -1).amax(1)                                        # [B]
        start = torch.where((start < 0) & (latest >= 0), latest + n, start)
    found = start >= 0
    idx = (start.clamp_min(0)[:, None] + torch.arange(k, device=dev)).clamp_max(W - 1)      # [B, k]
    tokens = hist.gather(1, idx)
    n_tokens = torch.where(found, (length - start).clamp(0, k), 0)
    return tokens, n_tokens


def propose(hist: torch.Tensor, length: torch.Tensor, n_new: torch.Tensor, finished: torch.Tensor, budget: torch.Tensor,
            ngram: int, min_ngram: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's proposal: :func:`find_continuations`, capped so no row proposes past its budget
    (``budget`` 0-dim: max_new_tokens - 1) and nothing for finished rows."""
    tokens, n = find_continuations(hist, length, ngram, min_ngram, k)
    room = (budget - n_new).clamp_min(0)
    return tokens, torch.minimum(n, room).masked_fill(finished, 0)


# Compiled proposal functions, one code object per (batch, history width, n-grams, k): dynamo's
# recompile budget is per code object (see decodekit-kvcache's _step_fn), and a process that
# serves several shapes must not run out of it.
_PROPOSE_FNS: dict[tuple, Callable] = {}


def compiled_propose(key: tuple, backend: str) -> Callable:
    fn = _PROPOSE_FNS.get((key, backend))
    if fn is None:
        own = own_code(propose, "propose_" + "_".join(str(x) for x in key))
        kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}
        if backend == "inductor":
            kwargs["mode"] = "reduce-overhead"  # one CUDA graph launch instead of ~70 small kernels
        fn = _PROPOSE_FNS[(key, backend)] = torch.compile(own, **kwargs)
    return fn


class PromptLookup(Drafter):
    """Draft by n-gram lookup in the prompt and the output so far.

    Fields:
        ngram: longest trailing n-gram to match (tried first, down to ``min_ngram``).
        k: most tokens proposed per step.
        min_ngram: shortest n-gram to match.
        fixed_width: propose exactly ``k`` tokens every step (rows without a match propose with
            ``lengths`` 0): no host sync, and the target's verify width ``1 + k`` never changes,
            so a compiled StaticCache step is traced once. ``False``: the width follows the
            longest real proposal and a step where no row matched is a plain one-token step (one
            host sync per step; cheaper where a wider forward costs more, i.e. on CPU).
            ``None`` (default): fixed on CUDA.
    """

    ngram: int = 3
    k: int = 10
    min_ngram: int = 1
    fixed_width: bool | None = None

    @field_validator("ngram", "k", "min_ngram")
    @classmethod
    def _pos(cls, v: int, info) -> int:
        return _positive(info.field_name, v)

    @model_validator(mode="after")
    def _order(self) -> "PromptLookup":
        if self.min_ngram > self.ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= ngram ({self.ngram})")
        return self

    def setup(self, state: DecodeState) -> None:
        B, dev = state.batch_size, state.device
        # Own left-aligned history (committed tokens incl. `last`): appending is a scatter, rollback
        # moves a length; no per-step re-gathering of the target's holey slot buffer.
        width = max(len(p) for p in state.prompt_ids) + state.max_new_tokens + self.k + 2
        self._fixed = dev.type == "cuda" if self.fixed_width is None else self.fixed_width
        # Fixed width beside a compiled target (decodekit-kvcache's StaticCache on CUDA): the
        # proposal is one compiled call too, so the step launches no small kernels for drafting.
        # The width is rounded up (the columns past a row's length are never matched) so that
        # generations of other lengths reuse the compiled function.
        self._compiled = None
        if self._fixed:
            from decodekit_speculative.static_draft import target_compiles

            on, backend = target_compiles(state)
            if on:
                width = max(256, 1 << (width - 1).bit_length())
                key = (B, width, self.ngram, self.min_ngram, self.k)
                self._compiled = (compiled_propose(key, backend), dev.type == "cuda")
        self._hist = torch.full((B, width + 1), state.pad_token_id, dtype=torch.long, device=dev)  # last column: dump
        for r, p in enumerate(state.prompt_ids):
            self._hist[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        self._len = state.prompt_lengths.clone().to(dev)
        self._budget = torch.tensor(state.max_new_tokens - 1, device=dev)

    def pre_logits(self, state: DecodeState) -> Proposal | None:
        W = self._hist.shape[1] - 1
        args = (self._hist[:, :W], self._len, state.n_new, state.finished, self._budget, self.ngram, self.min_ngram, self.k)
        if self._compiled is not None:
            fn, cuda = self._compiled
            try:
                if cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                tokens, n = fn(*args)
            except Exception as e:
                from decodekit.compiling import is_compile_error

                if not is_compile_error(e):
                    raise
                # A compiler error must not cost the generation: the eager proposal is the same.
                warnings.warn(f"decodekit PromptLookup: compiling the proposal failed ({type(e).__name__}); drafting eagerly",
                              RuntimeWarning, stacklevel=2)
                self._compiled = None
                tokens, n = propose(*args)
            else:
                tokens, n = tokens.clone(), n.clone()  # a CUDA graph's outputs are overwritten by its next replay
        else:
            tokens, n = propose(*args)
        if self._fixed:
            return Proposal(tokens=tokens, probs=None, lengths=n)
        # One host sync: a step whose rows found nothing runs as a plain T=1 step, and the forward
        # width follows the longest real proposal instead of always k.
        width = int(n.max())
        if width == 0:
            return None
        return Proposal(tokens=tokens[:, :width], probs=None, lengths=n)

    def accept(self, state: DecodeState) -> None:
        self._len = self._len - state.rolled_back
        T = state.step_tokens.shape[1]
        ar = torch.arange(T, device=state.device)
        dump = self._hist.shape[1] - 1
        idx = torch.where(ar[None] < state.accepted[:, None], self._len[:, None] + ar[None], dump)  # [B, T]
        self._hist.scatter_(1, idx, state.step_tokens)
        self._len = self._len + state.accepted
