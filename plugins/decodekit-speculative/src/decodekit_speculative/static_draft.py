"""Draft forwards on the static, compiled path: a preallocated KV store and fixed-shape compiled
draft passes, so drafting on a GPU costs compiled steps (~1.7 ms for SmolLM2-135M on an H200)
instead of eager ones (~15-19 ms each, issue #6).

Mirror. The draft's store holds slot ``j`` of the target's slot buffer in its own slot ``j``, as
the eager :class:`~decodekit_speculative.drafting.DraftNet` does, but nothing is ever cut: the
attention mask over the whole buffer is ``state.valid`` (what the target committed), so rollback
is the target's own pointer move, and rejected drafts beyond ``state.n_slots`` are masked until a
later pass overwrites them (gpt-fast's static cache: "rejecting is just not advancing input_pos").

Fixed shapes. A step drafts with

* pass 0, two queries at slots ``S-1, S``: the catch-up slot and ``last``. The only committed slot
  the draft can lack is ``S-1`` (the target's last accepted draft ``x_k`` when a row accepted all
  of them: the draft never feeds its own last proposal); rewriting it when the draft already has
  it recomputes the very same keys, and a row where it is a hole masks it. So the catch-up width
  is always 2, and no host sync decides it.
* passes 1..k-1, one query at slot ``S+i`` (the previous pass's pick).

so there are two compiled graphs per batch size and draft network. Only the first step of a
generation and the (rare) step after the target compacted its slots run an eager draft prefill.

Recompile budget. torch._dynamo caches compiled graphs *per code object* and stops compiling one
after ``recompile_limit`` (8) variants, running it eagerly from then on; every batch size, query
width and draft network is one variant. Each (network, width) therefore gets its own copy of the
pass function's code object (kept for the process, so later generations reuse its graphs).
"""

from __future__ import annotations

import itertools
import time
import weakref
from typing import Any, Callable

import torch

from decodekit.compiling import own_code
from decodekit.components import cache_kwarg, eager_attention
from decodekit.errors import DecodekitError
from decodekit.state import DecodeState
from decodekit_kvcache.layout import layout_from_config, round_up
from decodekit_kvcache.store import KVStore, lease, release, run_model

SUPPORTED_ATTENTION = ("sdpa", "eager")


def draft_pass(model: Any, store: KVStore, ids: torch.Tensor, pos: torch.Tensor, qvalid: torch.Tensor,
               kvalid: torch.Tensor, start: torch.Tensor, first_new: torch.Tensor | None) -> torch.Tensor:
    """One draft forward over ``Q`` queries per row at slots ``start .. start+Q-1`` (the function
    that is compiled). Returns the float32 logits of the last query, ``[B, V]``."""
    store.kv_len = store.capacity  # static shapes: attend over the whole (masked) buffer
    logits = run_model(model, store, ids, pos, qvalid, kvalid, start, first_new, 1)
    return logits[:, -1].float()


#: (tag, Q) -> a copy of ``draft_pass`` with its own code object (its own dynamo cache).
_PASS_FNS: dict[tuple[str, int], Callable] = {}


def compile_pass(tag: str, Q: int, backend: str) -> Callable:
    key = (tag, Q)
    fn = _PASS_FNS.get(key)
    if fn is None:
        fn = _PASS_FNS[key] = own_code(draft_pass, f"draft_pass__{tag}_q{Q}")
    # The tag names one draft network object, so dynamo's guards on its nn.Module attributes can be
    # skipped (most of a compiled call's host cost; see decodekit-kvcache's _step_fn): the
    # network is assumed not to be edited in place between generations.
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
    options: dict[str, Any] = {"guard_filter_fn": skip} if skip is not None else {}
    if backend == "inductor":
        from torch._inductor import list_mode_options

        options.update(list_mode_options("reduce-overhead"))  # CUDA graphs: the launch overhead is the cost here
    from decodekit_kvcache.caches import compile_with

    return compile_with(fn, {"backend": backend, "dynamic": False}, options)


_TAGS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_NEXT_TAG = itertools.count()


def network_tag(model: Any, extra: str = "") -> str:
    """A name per draft network that stays the same across generations (one code object each)."""
    tag = _TAGS.get(model)
    if tag is None:
        tag = _TAGS[model] = f"net{next(_NEXT_TAG)}"
    return tag + extra


class StaticDraftNet:
    """A draft network with a preallocated KV store mirroring the target's slots, and compiled
    fixed-shape draft passes."""

    def __init__(self, model: Any, state: DecodeState, k: int, *, backend: str, compiled: bool, tag: str) -> None:
        cfg = model.config
        impl = getattr(cfg, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTENTION:
            raise DecodekitError(
                f"the compiled draft path builds 4D attention masks, which attn_implementation={impl!r} cannot take; "
                "load the draft model with attn_implementation='sdpa' (or 'eager'), or set compile=False"
            )
        self.model, self.k, self.tag, self.backend, self.compiled = model, k, tag, backend, compiled
        self.layout = layout_from_config(cfg)
        cache_kwarg(model)  # read the forward's signature now, not inside a compiled pass
        self.device = state.device
        self.impl = impl
        self.B = state.batch_size
        self.passes = 0
        self.compiled_passes = 0
        self.warmup_s = 0.0
        self.prefills = 0
        self._fns: dict[int, Callable] = {}
        self._compactions = self._target_compactions(state)
        # The compiled target keeps rejected drafts as holes (Cache.keeps_holes) with room for as
        # many holes as tokens before it compacts: the mirror needs the same room.
        need = int(state.prompt_lengths.max()) + 2 * state.max_new_tokens + 2 * (k + 1)
        self._allocate(round_up(need, 64))

    # ------------------------------------------------------------------ buffers
    def _allocate(self, capacity: int) -> None:
        # Sliding layers keep a ring of the window plus this step's writes ahead of the last
        # committed position (k drafts + the catch-up slot).
        ring = self.layout.window + self.k + 1 if self.layout.window else 0
        old = getattr(self, "store", None)
        if old is not None:  # outgrown: its buffers go back to the pool now
            release(old)
        self.store = KVStore(self.layout, self.B, capacity, grow_block=None, ring=ring)
        self.store.attn_impl, self.store.device = self.impl, self.device
        self.store.pool_tag, self.store.pooled = f"draft:{self.tag}", self.compiled
        # Leased with the store (decodekit_kvcache.store.lease): the next generation of the same
        # shapes gets the same memory, so the compiled passes' CUDA graphs replay unchanged.
        self.kvalid = lease(self.store, (self.store.pool_tag, "kvalid"), (self.B, capacity), torch.bool, self.device, False,
                            pooled=self.compiled)  # [B, C]
        self.start = lease(self.store, (self.store.pool_tag, "start"), (), torch.long, self.device, 0, pooled=self.compiled)
        if self.compiled:
            # mutated in place between replays: static addresses keep CUDA graphs valid
            torch._dynamo.mark_static_address(self.kvalid)
            torch._dynamo.mark_static_address(self.start)
        self.hi = 0        # columns of kvalid at or beyond this are False
        self.seen = 0      # 0: the store holds nothing yet (prefill)

    def release(self) -> None:
        """Hand the buffers back to the pool (this net's generation is over): the next net of the
        same shapes gets the same addresses, so its compiled passes replay without re-recording."""
        release(self.store)

    @staticmethod
    def _target_compactions(state: DecodeState) -> int:
        # decodekit-kvcache's StaticCache squeezes holes out of the slot buffer when the next step
        # would not fit (rare); the mirror is then stale and is rebuilt by a prefill.
        return int(state.extras.get("stats", {}).get("compactions", 0))

    # ------------------------------------------------------------------ passes
    def _run(self, Q: int, ids: torch.Tensor, pos: torch.Tensor, qvalid: torch.Tensor, first_new: torch.Tensor | None) -> torch.Tensor:
        if not self.compiled:
            return draft_pass(self.model, self.store, ids, pos, qvalid, self.kvalid, self.start, first_new)
        fn = self._fns.get(Q)
        first = fn is None
        if first:
            fn = self._fns[Q] = compile_pass(self.tag, Q, self.backend)
            t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = fn(self.model, self.store, ids, pos, qvalid, self.kvalid, self.start, first_new)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.warmup_s += time.perf_counter() - t0
        self.compiled_passes += 1
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay

    def _prefill(self, state: DecodeState) -> torch.Tensor:
        """Eager: every slot of the target's buffer plus ``last`` (first step, or after a compaction)."""
        S, B = state.n_slots, self.B
        if S + self.k + 1 > self.store.capacity:  # a dynamic target with ragged holes outgrew it
            self._allocate(round_up(2 * (S + self.k + 1), 64))
        ones = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        ids = torch.cat([state.tokens, state.last[:, None]], 1)                     # [B, S+1]
        pos = torch.cat([state.slot_positions(), (state.committed - 1)[:, None]], 1)  # [B, S+1]
        qvalid = torch.cat([state.valid, ones], 1)                                  # [B, S+1]
        self.store.kv_len = S + 1
        first_new = state.committed - 1 if self.layout.n_sliding else None
        with torch.no_grad(), eager_attention(state.device):  # the draft's prefill: a new length each time
            logits = run_model(self.model, self.store, ids, pos, qvalid, torch.zeros_like(qvalid), 0, first_new, 1)
        self.kvalid[:, : S + 1].copy_(qvalid)
        if self.hi > S + 1:
            self.kvalid[:, S + 1 : self.hi].fill_(False)
        self.hi = max(self.hi, S + 1)
        self.prefills += 1
        self.passes += 1
        self.seen = S + 1
        return logits[:, -1].float()

    def first(self, state: DecodeState) -> torch.Tensor:
        """Pass 0 of a step: returns the logits after ``last`` ``[B, V]``."""
        S = state.n_slots
        compactions = self._target_compactions(state)
        if self.seen == 0 or S == 0 or compactions != self._compactions or S + self.k + 1 > self.store.capacity:
            self._compactions = compactions
            return self._prefill(state)
        # The cached slots are exactly what the target committed; everything after is stale.
        self.kvalid[:, :S].copy_(state.valid)
        if self.hi > S:
            self.kvalid[:, S : self.hi].fill_(False)
        self.start.fill_(S - 1)
        catch = state.valid[:, S - 1]                                                   # [B]
        ids = torch.stack([state.tokens[:, S - 1], state.last], 1)                      # [B, 2]
        pos = ((state.committed - 2)[:, None] + torch.arange(2, device=self.device)).clamp_min(0)  # [B, 2]
        qvalid = torch.stack([catch, torch.ones_like(catch)], 1)                       # [B, 2]
        # ring entries at or beyond first_new are stale: the catch-up position is rewritten only
        # where the slot is real
        first_new = state.committed - 1 - catch.long() if self.layout.n_sliding else None
        logits = self._run(2, ids, pos, qvalid, first_new)
        self.kvalid[:, S - 1 : S + 1].copy_(qvalid)
        self.hi = max(self.hi, S + 1)
        self.passes += 1
        return logits

    def next(self, state: DecodeState, x: torch.Tensor, i: int) -> torch.Tensor:
        """Pass ``i`` (1..k-1): feed the previous pick ``x`` [B] at slot ``S+i``."""
        S = state.n_slots
        self.start.fill_(S + i)
        pos = (state.committed - 1 + i)[:, None]                                         # [B, 1]
        qvalid = self._ones()
        first_new = state.committed - 1 + i if self.layout.n_sliding else None
        logits = self._run(1, x[:, None], pos, qvalid, first_new)
        self.kvalid[:, S + i].fill_(True)
        self.hi = max(self.hi, S + i + 1)
        self.passes += 1
        return logits

    def _ones(self) -> torch.Tensor:
        ones = getattr(self, "_ones_cache", None)
        if ones is None:
            ones = self._ones_cache = torch.ones(self.B, 1, dtype=torch.bool, device=self.device)
        return ones


def target_compiles(state: DecodeState) -> tuple[bool, str]:
    """Does the strategy's target run decodekit-kvcache's compiled StaticCache step (and with which
    backend)? Read from the cache's public fields: ``compile`` (None: on CUDA) and ``compile_backend``."""
    from decodekit_kvcache import StaticCache

    cache = getattr(state.extras.get("strategy"), "cache", None)
    if not isinstance(cache, StaticCache):
        return False, "inductor"
    on = state.device.type == "cuda" if cache.compile is None else bool(cache.compile)
    return on, cache.compile_backend
