"""The cache components: :class:`DynamicCache` (the default), :class:`StaticCache` and
:class:`SlidingWindowCache`.

All three keep the core's invariant: after every step the full layers hold exactly
``state.n_slots`` slots mirroring ``state.tokens``/``state.valid`` (committed tokens minus each
row's last, holes masked) and the sliding layers hold each row's last positions up to the last
committed-minus-one. Rollback is O(1): a length pointer for full layers, a position bound for rings.
"""

from __future__ import annotations

import itertools
import time
import warnings
import weakref
from typing import Any, Callable

import torch
from pydantic import Field

from decodekit.compiling import is_compile_error, own_code
from decodekit.components import Cache, Sampler, cache_kwarg, eager_attention
from decodekit.errors import DecodekitError
from decodekit.state import DecodeState

from decodekit_kvcache.layout import Layout, kv_bytes, layout_from_config, round_up
from decodekit_kvcache.store import KVStore, lease, release, run_model

SUPPORTED_ATTENTION = ("sdpa", "eager")


def bucket(t: int) -> int:
    """Verify lengths are padded to powers of two so compiled graphs are reused (1, 2, 4, 8, ...)."""
    return 1 << (t - 1).bit_length()


def _drafter_depth(state: DecodeState) -> int:
    strategy = state.extras.get("strategy")
    drafter = getattr(strategy, "drafter", None)
    return int(drafter.max_proposals()) if drafter is not None else 0


def _queries(state: DecodeState, seen: int, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tokens, positions and validity of this forward's queries: slots the cache has not seen
    (the prompt, at prefill) followed by ``inputs`` (``last`` + proposals)."""
    B, T = inputs.shape
    new_pos = (state.committed - 1).unsqueeze(1)
    if T > 1:
        new_pos = new_pos + torch.arange(T, device=state.device)  # [B, T]
    if seen == state.n_slots:  # decoding: the cache has every slot, the queries are the inputs
        return inputs, new_pos, None
    ids = torch.cat([state.tokens[:, seen:], inputs], 1)                               # [B, Q]
    pos = torch.cat([state.slot_positions()[:, seen:], new_pos], 1)
    qvalid = torch.cat([state.valid[:, seen:], torch.ones(B, T, dtype=torch.bool, device=state.device)], 1)
    return ids, pos, qvalid


def _ones(cache: Cache, inputs: torch.Tensor) -> torch.Tensor:
    """A reused all-True ``[B, T]`` query mask (read-only by contract: saves an allocation per step)."""
    ones = getattr(cache, "_ones_cache", None)
    if ones is None or ones.shape != inputs.shape or ones.device != inputs.device:
        ones = torch.ones(inputs.shape, dtype=torch.bool, device=inputs.device)
        cache._ones_cache = ones
    return ones


class _KVCache(Cache):
    """Shared machinery; subclasses choose how full layers are sized."""

    max_rollback: int = Field(
        0, ge=0,
        description="tokens a component (FSM, stop handling) may roll back beyond this step's own proposals; "
        "sliding layers keep this many extra positions",
    )

    # ------------------------------------------------------------------ setup
    def teardown(self, state: DecodeState) -> None:
        # Pooled buffers (compiled stores only) go back now: the next generation of these shapes
        # replays its CUDA graphs on them (see store.lease).
        store = self.__dict__.get("_store")
        if store is not None:
            release(store)

    def _capacity(self, state: DecodeState, T_max: int) -> tuple[int, int | None]:
        """(full-layer slots to allocate now, growth block or None for static)."""
        raise NotImplementedError

    def _t_max(self, state: DecodeState) -> int:
        return _drafter_depth(state) + 1

    def setup(self, state: DecodeState) -> None:
        model = state.model
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTENTION:
            raise DecodekitError(
                f"{type(self).__name__} builds its own 4D attention masks, which attn_implementation={impl!r} "
                f"cannot take; load the model with attn_implementation='sdpa' (or 'eager')"
            )
        self._layout: Layout = layout_from_config(model.config)
        cache_kwarg(model)  # read the forward's signature now, not inside a compiled step
        T_max = self._t_max(state)
        self._depth = T_max - 1 + self.max_rollback
        capacity, block = self._capacity(state, T_max)
        ring = self._layout.window + self._depth if self._layout.window else 0
        old = self.__dict__.get("_store")
        if old is not None:  # this component's previous generation is over: its buffers are reusable
            release(old)
        self._store = KVStore(self._layout, state.batch_size, capacity, grow_block=block, ring=ring)
        self._store.attn_impl, self._store.device = impl, state.device
        # transformers builds no mask for one SDPA query without padding; only full layers qualify
        # (a sliding layer's ring needs its mask).
        self._maskless = impl == "sdpa" and not self._layout.n_sliding
        self._seen = 0
        self._T_max = T_max
        self._high = torch.full((state.batch_size,), -1, dtype=torch.long, device=state.device)
        self._accept_step = -1

    def past_key_values(self) -> Any:
        return self._store

    # ------------------------------------------------------------------ per token
    def forward(self, state: DecodeState, inputs: torch.Tensor) -> torch.Tensor:
        seen, T = self._seen, inputs.shape[1]
        ids, pos, qvalid = _queries(state, seen, inputs)
        Q = ids.shape[1]
        store = self._store
        store.reserve(seen + Q)
        store.kv_len = seen + Q
        filled = False
        if qvalid is None:  # decoding: every query is real
            qvalid = _ones(self, inputs)
            filled = T == 1
            if filled and state.dense and self._maskless:
                # No live row has a hole or padding: one query attends to everything cached.
                kv_valid = None
            else:
                # One query per row: mark its own slot here, in the same op (run_model's fast path).
                kv_valid = torch.cat([state.valid, qvalid if filled else torch.zeros_like(qvalid)], 1)
        else:
            kv_valid = torch.cat([state.valid[:, :seen], torch.zeros_like(qvalid)], 1)  # [B, seen+Q]
        first_new = state.committed - 1 if self._layout.n_sliding else None  # only rings need it
        with eager_attention(state.device):  # no cuDNN plan per new length (see eager_attention)
            logits = run_model(state.model, store, ids, pos, qvalid, kv_valid, seen, first_new, T, self_filled=filled)
        self._note_written(pos, qvalid)
        self._seen = seen + Q
        return logits

    def _note_written(self, pos: torch.Tensor, qvalid: torch.Tensor) -> None:
        if self._layout.window:
            self._high = torch.maximum(self._high, pos.masked_fill(~qvalid, -1).amax(1))

    def accept(self, state: DecodeState) -> None:
        # Called a second time in one step only after a rollback request: the one moment a ring may
        # have lost positions the rolled-back rows now need again. Check it (one host sync, only on
        # rollback steps) and fail loudly rather than attend to a wrong window.
        if not self._layout.window:  # full layers only: a rollback is a pointer move, nothing to check
            return
        again = self._accept_step == state.step
        self._accept_step = state.step
        if not again:
            return
        ahead = self._high - (state.committed - 1)    # [B] positions written beyond the last committed
        worst = int(ahead.max())
        if worst > self._depth:
            row = int(ahead.argmax())
            raise DecodekitError(
                f"{type(self).__name__}: rollback on row {row} reaches {worst} positions behind the newest key, deeper "
                f"than the sliding layers keep ({self._depth} beyond the window of {self._layout.window}); "
                f"use {type(self).__name__}(max_rollback={worst - self._T_max + 1}) or more"
            )

    def step(self, state: DecodeState, inputs: torch.Tensor, process: Callable[[DecodeState], None], sampler: Sampler):
        if not torch.is_grad_enabled():  # the host loop already switched autograd off
            return super().step(state, inputs, process, sampler)
        with torch.no_grad():  # decoding never backpropagates: no autograd graph per step
            return super().step(state, inputs, process, sampler)

    def cache_update(self, state: DecodeState) -> None:
        """Rollback is a pointer move: slots past ``n_slots`` are overwritten by the next forward."""
        self._seen = state.n_slots

    def allocated_bytes(self) -> int:
        return self._store.allocated_bytes() if hasattr(self, "_store") else 0

    def estimate_bytes(self, batch: int, full_slots: int, dtype_bytes: int, layout: Layout | None = None) -> int:
        """What :func:`decodekit_kvcache.layout.kv_bytes` predicts for this cache's settings."""
        return kv_bytes(layout or self._layout, batch, full_slots, self._depth, dtype_bytes)["total"]


class DynamicCache(_KVCache):
    """Grows full layers as needed (in blocks of ``block`` slots); rollback moves a pointer.
    The default cache once decodekit-kvcache is installed."""

    block: int = Field(64, ge=1, description="full layers grow by whole blocks of this many slots (fewer copies)")

    def _capacity(self, state: DecodeState, T_max: int) -> tuple[int, int | None]:
        return round_up(int(state.prompt_lengths.max()) + T_max, self.block), self.block


class StaticCache(_KVCache):
    """Preallocated full layers; rollback moves the length pointer (no copy; rejected slots are
    overwritten later). On CUDA the decode step (forward + processors + selection) runs compiled
    with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), verify lengths bucketed to powers
    of two so graphs are reused."""

    max_len: int | None = Field(
        None, ge=1,
        description="slots per row in full layers; None sizes it to the longest prompt + max_new_tokens "
        "(+ proposals), rounded up to 64",
    )
    compile: bool | None = Field(None, description="compile the decode step; None: on CUDA only")
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager' checks tracing without codegen)")
    module_guards: bool = Field(
        False,
        description="re-check every nn.Module attribute of the model before each compiled step (dynamo's default; "
        "~0.3 ms per step on an H200 host). False: the step is compiled per model object and assumes the model is "
        "not modified in place between generations (set True if you toggle adapters or edit modules in place)",
    )

    def _compiled_on(self, state: DecodeState) -> bool:
        return state.device.type == "cuda" if self.compile is None else self.compile

    def _t_max(self, state: DecodeState) -> int:
        T = _drafter_depth(state) + 1
        return bucket(T) if self._compiled_on(state) else T

    def _capacity(self, state: DecodeState, T_max: int) -> tuple[int, int | None]:
        longest = int(state.prompt_lengths.max())
        # A finished row keeps its longest-1 + max_new_tokens slots while other rows still step,
        # and every step writes T_max slots for all rows.
        need = longest + state.max_new_tokens + T_max - 1
        if self.max_len is None:
            # The compiled path keeps rejected drafts as holes (no host sync per step, see
            # keeps_holes) and compacts when they fill the buffer: room for as many holes as
            # tokens keeps that rare. An explicit max_len only has to hold ``need``.
            holes = state.max_new_tokens if T_max > 1 and self._compiled_on(state) else 0
            return round_up(need + holes, 64), None
        if need > self.max_len:
            extra = f" + {T_max - 1} proposal slots" if T_max > 1 else ""
            raise DecodekitError(
                f"StaticCache(max_len={self.max_len}) is too short: the longest prompt ({longest} tokens) + "
                f"max_new_tokens ({state.max_new_tokens}){extra} need max_len >= {need}; raise max_len or lower max_new_tokens"
            )
        return self.max_len, None

    def setup(self, state: DecodeState) -> None:
        super().setup(state)
        self._graph = self._compiled_on(state)
        # Leased with the store (see store.lease): a later generation's compiled graphs replay on
        # the same addresses.
        self._store.pooled = self._graph  # only replayed graphs care about addresses
        self._kvalid = lease(self._store, ("target", "kvalid"), (state.batch_size, self._store.capacity), torch.bool,
                             state.device, False, pooled=self._graph)
        self._kv_hi = 0  # columns of _kvalid at or beyond this are False
        self._start = lease(self._store, ("target", "start"), (), torch.long, state.device, 0, pooled=self._graph)
        if self._graph:
            torch._dynamo.mark_static_address(self._kvalid)
            torch._dynamo.mark_static_address(self._start)
        self._fns: dict[int, Callable] = {}
        self._qvalid: dict[tuple[int, int, int], torch.Tensor] = {}
        self._stats = state.extras.setdefault("stats", {})
        self._stats.update(warmup_s=0.0, compiled_steps=0, compactions=0)
        self._strategy = state.extras.get("strategy")
        self._model = state.model

    def keeps_holes(self) -> bool:
        return self._graph

    def cache_update(self, state: DecodeState) -> None:
        S = state.n_slots
        if S + self._T_max > self._store.capacity:
            S = self._compact(state)
        self._seen = S
        if self._graph:
            self._kvalid[:, :S].copy_(state.valid)
            if S < self._kv_hi:  # slots beyond S were valid before a trim or compaction
                self._kvalid[:, S:self._kv_hi].fill_(False)
            self._kv_hi = S
            self._start.fill_(S)

    def _compact(self, state: DecodeState) -> int:
        """Squeeze holes out of the slot buffer and the full layers together (ragged acceptance can
        leave more slots than committed tokens). Rare: only when the next step would not fit."""
        order = torch.sort(state.valid.to(torch.uint8), dim=1, stable=True).indices  # holes first, order kept
        width = int(state.valid.sum(1).max())
        order = order[:, order.shape[1] - width:]
        self._stats["compactions"] += 1
        self._store.gather_slots(order)
        state.tokens, state.valid = state.tokens.gather(1, order), state.valid.gather(1, order)
        if width + self._T_max > self._store.capacity:  # pragma: no cover - setup sized it for this
            raise DecodekitError(f"StaticCache is full: {width} committed slots + {self._T_max} do not fit {self._store.capacity}")
        return width

    # ------------------------------------------------------------------ the compiled step
    def step(self, state: DecodeState, inputs: torch.Tensor, process: Callable[[DecodeState], None], sampler: Sampler):
        if not self._graph or self._seen == 0:  # eager off the graph path, and for the prefill
            return super().step(state, inputs, process, sampler)
        try:
            with torch.no_grad():
                return self._compiled_step(state, inputs, process, sampler)
        except _CompileFailed as e:
            # A compiler bug must not cost the user a generation: on an H200 (torch 2.11) Inductor
            # failed to generate code for top-p's cumsum over a 49k vocabulary inside the step. The
            # failure happens before the step runs, so the eager step is exact from here on.
            warnings.warn(
                f"decodekit StaticCache: compiling the decode step failed ({e}); continuing with the eager "
                "step (correct, slower). Set compile=False to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._graph = False
            self._stats["compile_fallback"] = str(e)
            return super().step(state, inputs, process, sampler)

    def _compiled_step(self, state: DecodeState, inputs: torch.Tensor, process: Callable[[DecodeState], None], sampler: Sampler):
        B, T = inputs.shape
        Tb = bucket(T)
        proposals = state.proposals
        if Tb > T:  # pad with copies of the last input; padded queries are marked invalid
            pad = inputs[:, -1:].expand(B, Tb - T)
            inputs = torch.cat([inputs, pad], 1)
            state.proposals = inputs[:, 1:]
        fn = self._fns.get(Tb)
        first = fn is None
        if first:
            fn = self._fns[Tb] = self._make_step(Tb)
            t0 = time.perf_counter()
        qvalid = self._qvalid.get((B, Tb, T))
        if qvalid is None:  # bucket padding is not real; one tensor per shape, not one per step
            qvalid = self._qvalid[(B, Tb, T)] = (torch.arange(Tb, device=state.device) < T).expand(B, Tb).contiguous()
        torch.compiler.cudagraph_mark_step_begin()
        try:
            target, probs = fn(state.model, self._store, process, sampler, state, inputs, qvalid, self._kvalid, self._start)
        except Exception as e:
            # Compiling happens before the graph runs (on a first call or a recompile), so a
            # compiler error leaves the state untouched.
            if not is_compile_error(e):
                raise
            state.proposals = proposals
            self._fns.pop(Tb, None)
            raise _CompileFailed(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        if first:
            if state.device.type == "cuda":
                torch.cuda.synchronize(state.device)
            self._stats["warmup_s"] += time.perf_counter() - t0
        self._stats["compiled_steps"] += 1
        if self._layout.window:
            self._note_written(state.committed[:, None] - 1 + torch.arange(Tb, device=state.device), qvalid)
        state.proposals = proposals
        if Tb > T:
            state.scores = state.scores[:, :T]
            target, probs = target[:, :T], None if probs is None else probs[:, :T]
        # Graph outputs are overwritten by the next replay: the caller keeps copies (contiguous:
        # a bucket-padded slice keeps the padded strides, and compiled consumers guard on strides).
        fmt = torch.contiguous_format
        return target.clone(memory_format=fmt), None if probs is None else probs.clone(memory_format=fmt)

    def _make_step(self, T: int) -> Callable:
        model = None if self.module_guards else self._model
        return _step_fn(self._store.batch, T, self.compile_backend, _chain(self._strategy), model, self._store.capacity)


def _decode_step(model, store, process, sampler, state, inputs, qvalid, kvalid, start):
    """Forward + processors + selection over a static cache: the unit compiled per (batch, width)."""
    T = inputs.shape[1]
    pos = (state.committed - 1)[:, None] + torch.arange(T, device=inputs.device)  # [B, T]
    store.kv_len = store.capacity  # static shapes: attend over the whole (masked) buffer
    logits = run_model(model, store, inputs, pos, qvalid, kvalid, start, state.committed - 1, T)
    state.scores = logits.float()                                         # [B, T, V]
    process(state)
    return sampler.sample(state)


# Compiled steps, shared by every StaticCache of the process (a second generation reuses the graphs).
_STEP_FNS: dict[tuple[int, int, str], Callable] = {}


def _chain(strategy: Any) -> str:
    """What the compiled step runs besides the model: the processors' and the sampler's types, in
    order. Steps of different chains get different code objects (see :func:`_step_fn`)."""
    if strategy is None:
        return ""
    _, processors, sampler, _ = strategy.resolved()
    return "|".join(type(c).__qualname__ for c in [*processors, sampler])


#: A name per model object for as long as it lives (a dead model's id may be reused by a new one).
_MODEL_TAGS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_NEXT_MODEL = itertools.count()


def model_tag(model: Any) -> str:
    tag = _MODEL_TAGS.get(model)
    if tag is None:
        tag = _MODEL_TAGS[model] = f"m{next(_NEXT_MODEL)}"
    return tag


def _step_fn(B: int, T: int, backend: str, chain: str = "", model: Any = None, capacity: int = 0) -> Callable:
    """The compiled step for batch ``B`` and verify width ``T``.

    Dynamo keeps its compiled variants per *code object* and stops compiling after
    ``recompile_limit`` (8) of them, silently running eagerly from then on. One code object for
    every (batch, width) pair hit that limit in a benchmark that ran batch 1 and 8 with several
    widths (prompt lookup at batch 8 fell to 0.53x of plain greedy), so each (batch, width,
    processor chain, model, buffer length) gets its own copy of the code, and its own budget.
    """
    # With a model: dynamo's guards on the model's nn.Module attributes are skipped (checking them
    # is most of a compiled call's host overhead: ~1.0 of 1.1 ms before each step of a 30-layer
    # model on a 2-core CPU, 0.45 ms without), which is sound only for that very model object, so
    # the step is that model's own (and its training flag's: dropout would differ).
    own_model = None if model is None else (model_tag(model), bool(model.training))
    # The buffers' length is a static shape too: each one its own code object (and budget).
    key = (B, T, backend, chain, own_model, capacity)
    fn = _STEP_FNS.get(key)
    if fn is None:
        # One code object per chain too: every processor chain traced through one code object
        # would count against the same budget (a process trying 8 chains ran the 9th eagerly).
        name = f"decode_step_b{B}_t{T}" + (f"_c{len([k for k in _STEP_FNS if k[:3] == key[:3]])}" if chain or own_model else "")
        own = own_code(_decode_step, name)
        kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}
        options: dict[str, Any] = {}
        if backend == "inductor":
            from torch._inductor import list_mode_options

            options.update(list_mode_options("reduce-overhead"))  # CUDA graphs
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
        if own_model is not None and skip is not None:
            options["guard_filter_fn"] = skip
        fn = _STEP_FNS[key] = compile_with(own, kwargs, options)
    return fn


def compile_with(fn: Callable, kwargs: dict[str, Any], options: dict[str, Any]) -> Callable:
    """``torch.compile(fn, **kwargs, options=options)`` (it takes ``mode`` or ``options``, not both:
    callers spell out the mode's options). A torch that does not know ``guard_filter_fn`` gets the
    same call without it: slower guards, same results."""
    if not options:
        return torch.compile(fn, **kwargs)
    try:
        return torch.compile(fn, **kwargs, options=dict(options))
    except (RuntimeError, TypeError, ValueError):
        if "guard_filter_fn" not in options:
            raise
        rest = {k: v for k, v in options.items() if k != "guard_filter_fn"}
        return torch.compile(fn, **kwargs, **({"options": rest} if rest else {}))


class _CompileFailed(Exception):
    """The compiler could not build the decode step (raised before the step ran)."""


class SlidingWindowCache(StaticCache):
    """A :class:`StaticCache` for models with sliding-window layers (Mistral, Gemma3): the name
    transformers users look for. Every cache here already keeps sliding layers as rings of the
    window plus the deepest rollback; this one refuses models without sliding layers, where the
    name would promise a memory bound it cannot keep."""

    def setup(self, state: DecodeState) -> None:
        layout = layout_from_config(state.model.config)
        if not layout.window:
            raise DecodekitError(
                "SlidingWindowCache: this model has no sliding-window layers (no sliding_window / layer_types in its "
                "config); use StaticCache or DynamicCache"
            )
        super().setup(state)
