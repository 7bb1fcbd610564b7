"""The server's static KV cache: rows live in fixed batch slots of one preallocated store.

:class:`decodekit.batching.Batch` keeps a dynamic cache: every step concatenates new keys, a joining
row left-pads and re-concatenates everyone's KV tensors, a leaving row is cut out with
``index_select``. :class:`StaticBatch` keeps the same continuous batch (cohorts, one shared forward,
the core's commit and verify) over a :class:`StaticBatchCache` allocated once:

* full layers ``[max_batch, H_kv, max_len, D]``, sliding layers rings ``[max_batch, H_kv, R + 1, D]``
  (decodekit-kvcache's :class:`~decodekit_kvcache.store.KVStore`, written by
  :func:`~decodekit_kvcache.store.run_model`, which builds the 4D masks from the slot buffer);
* the shared :class:`~decodekit.DecodeState` always has ``max_batch`` rows; a free batch slot is a
  finished row with no valid slot (it commits nothing and nothing attends to it);
* **join**: the joining rows are prefilled in a batch of their own (decodekit-kvcache's
  ``DynamicCache`` with the same ring size), then their slots and KV entries are written into free
  batch slots, right-aligned to the running columns like a left-padded prompt. No other row moves;
* **leave**: the row's batch slot is marked free; the next request overwrites its memory;
* **columns** are slots exactly as in the core's slot buffer. They only grow (one per step, plus a
  joiner longer than the current width); when the next step would not fit ``max_len``, every row's
  valid slots are gathered to the left (compaction, rare: once per ``max_len - width`` steps).

The forward runs over all ``max_batch`` rows when ``shape_stable`` (a fixed shape, what a CUDA graph
needs; the default on CUDA), else over the occupied prefix of batch slots (the lowest free slot is
taken first), which on a CPU costs what the live rows cost.

**Compiled step** (``compile``, the default on CUDA): the decode forward runs as decodekit-kvcache's
compiled step (``torch.compile(mode="reduce-overhead")``, CUDA graphs), the same unit
:class:`~decodekit_kvcache.StaticCache` compiles, with every shape fixed: ``max_batch`` rows, the
whole ``max_len`` columns attended under a mask (``[max_batch, max_len]``, a buffer at a static
address, refreshed from the slot buffer before each step), the first written slot a 0-dim tensor,
and the step's width bucketed to a power of two (1 without drafters). One graph per width, compiled
once per process, so joins, leaves and compactions never recompile. The processors and the sampler
run after it, eagerly, per cohort: each request brings its own strategy and parameters, and a graph
that contained them would be specialised (recompiled) per temperature, top-p or penalty value. A
compiler error falls back to the eager forward (``stats["compile_fallback"]`` says why).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Hashable

import torch
from pydantic import Field

from decodekit.batching import Batch, RowSpec
from decodekit.compiling import is_compile_error
from decodekit.components import Cache, cache_kwarg, eager_attention
from decodekit.errors import DecodekitError
from decodekit.loop import _trim
from decodekit.state import DecodeState
from decodekit.strategy import Strategy
from decodekit_kvcache import DynamicCache as KVDynamicCache
from decodekit_kvcache.caches import _CompileFailed, _step_fn, bucket
from decodekit_kvcache.layout import FULL, kv_bytes, layout_from_config
from decodekit_kvcache.store import KVStore, run_model

SUPPORTED_ATTENTION = ("sdpa", "eager")
log = logging.getLogger("decodekit.serve")


def proposals_of(strategy: Strategy) -> int:
    """The most tokens the strategy's drafter proposes per step (0 without a drafter)."""
    drafter = strategy.resolved()[3]
    return int(drafter.max_proposals()) if drafter is not None else 0


class StaticBatchCache(Cache):
    """A preallocated KV store whose batch dimension holds fixed batch slots.

    Owned by a :class:`StaticBatch`, not by a strategy. ``setup`` allocates everything; nothing is
    allocated per step or per request."""

    max_batch: int = Field(16, ge=1, description="batch slots (rows decoded together)")
    max_len: int = Field(2048, ge=2, description="full-layer slots per row: prompt + max_tokens (+ proposals) must fit")
    max_depth: int = Field(
        16, ge=0,
        description="sliding layers: positions a step may write ahead of the last committed token "
        "(drafter proposals + rollback); the rings keep the window plus this many",
    )
    shape_stable: bool | None = Field(None, description="forward over all max_batch rows every step; None: on CUDA only")
    compile: bool | None = Field(None, description="run the decode forward as a compiled step (implies shape_stable); None: on CUDA only")
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager'/'aot_eager' check tracing without codegen)")

    def setup(self, state: DecodeState) -> None:
        model = state.model
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTENTION:
            raise DecodekitError(
                f"the static server cache builds 4D attention masks, which attn_implementation={impl!r} cannot take; "
                "load the model with attn_implementation='sdpa' (or 'eager'), or serve with --cache dynamic"
            )
        layout = self._layout = layout_from_config(model.config)
        cache_kwarg(model)  # read the forward's signature now, not inside the compiled step
        B = state.batch_size
        ring = layout.window + self.max_depth if layout.window else 0
        store = KVStore(layout, B, self.max_len, grow_block=None, ring=ring)
        store.attn_impl, store.device = impl, state.device
        # Allocate every layer now: the memory bound is paid (and checked) when the server starts.
        like = torch.empty(B, layout.kv_heads, 1, layout.head_dim, dtype=model.dtype, device=state.device)
        for i in range(len(layout.kinds)):
            store._allocate(i, like)
        if layout.window:
            store.ring_pos = torch.full((B, ring + 1), -1, dtype=torch.long, device=state.device)
        self._store = store
        on_cuda = state.device.type == "cuda"
        self._compiled = on_cuda if self.compile is None else self.compile
        if self._compiled and self.shape_stable is False:
            raise DecodekitError("the compiled static step needs fixed shapes: drop shape_stable=False or set compile=False")
        self._stable = self._compiled or (on_cuda if self.shape_stable is None else self.shape_stable)
        self._stats: dict[str, Any] = {"compiled": self._compiled, "compiled_steps": 0, "eager_steps": 0, "warmup_s": 0.0}
        if self._compiled:
            # The compiled step's inputs that change every step live at fixed addresses (CUDA graphs
            # replay on them): the attention mask over all max_len columns and the first slot written.
            self._kvalid = torch.zeros(B, self.max_len, dtype=torch.bool, device=state.device)
            self._kv_hi = 0  # columns of _kvalid at or beyond this are False
            self._start = torch.zeros((), dtype=torch.long, device=state.device)
            for t in (self._kvalid, self._start) + ((store.ring_pos,) if store.ring_pos is not None else ()):
                torch._dynamo.mark_static_address(t)
            self._warm: set[int] = set()
            self._qvalid: dict[tuple[int, int], torch.Tensor] = {}
        self._views: dict[int, KVStore] = {}
        self._seen = 0
        self._active = 0  # batch slots [0, active) hold every live row
        self._high = torch.full((B,), -1, dtype=torch.long, device=state.device)  # newest position written per row
        self._ones: dict[tuple[int, int], torch.Tensor] = {}

    def past_key_values(self) -> Any:
        return self._store

    def allocated_bytes(self) -> int:
        return self._store.allocated_bytes() if hasattr(self, "_store") else 0

    @property
    def stats(self) -> dict[str, Any]:
        """``compiled`` (the compiled step is on), ``compiled_steps``/``eager_steps`` run, ``warmup_s``
        (first compiled call per step width: compile or CUDA-graph capture) and, after a compiler
        error, ``compile_fallback`` (why the forward runs eagerly)."""
        return self._stats

    def step_width(self, T: int) -> int:
        """Slots a step with ``T`` inputs writes per row: the compiled step pads to a power of two."""
        return bucket(T) if self._compiled else T

    def estimate_bytes(self, dtype_bytes: int) -> int:
        """What decodekit-kvcache's ``kv_bytes`` predicts for this store (``decodekit memory``)."""
        return kv_bytes(self._layout, self.max_batch, self.max_len, self.max_depth, dtype_bytes)["total"]

    # ------------------------------------------------------------------ the step
    def _rows(self, n: int) -> KVStore:
        """The store restricted to batch slots ``[0, n)``: views of the same memory, so the model's
        writes land in the full store (kept per ``n``; the tensors never move)."""
        s = self._store
        if n == s.batch:
            return s
        v = self._views.get(n)
        if v is None:
            v = KVStore(s.layout, n, s.capacity, grow_block=None, ring=s.ring)
            v.keys, v.values = [t[:n] for t in s.keys], [t[:n] for t in s.values]
            v.ring_pos = None if s.ring_pos is None else s.ring_pos[:n]
            v.attn_impl, v.device = s.attn_impl, s.device
            self._views[n] = v
        return v

    def forward(self, state: DecodeState, inputs: torch.Tensor) -> torch.Tensor:
        """Decode ``inputs`` ``[B, T]`` (``last`` + proposals) at slots ``seen .. seen+T-1`` of every
        row; returns ``[B, T, V]`` logits (zeros for batch slots beyond the occupied prefix)."""
        if self._seen != state.n_slots:
            raise DecodekitError(f"static server cache out of step: it holds {self._seen} slots, the batch has {state.n_slots}")
        if self._compiled:
            try:
                return self._compiled_forward(state, inputs)
            except _CompileFailed as e:
                self._fall_back(e)
        return self._eager_forward(state, inputs)

    def _compiled_forward(self, state: DecodeState, inputs: torch.Tensor) -> torch.Tensor:
        """The forward as decodekit-kvcache's compiled step: every shape fixed (see the module doc);
        no host sync."""
        B, T = inputs.shape
        seen, Tb = self._seen, bucket(T)
        if seen + Tb > self.max_len:  # pragma: no cover - StaticBatch._make_room compacts before this
            raise DecodekitError(f"static server cache overflow: {seen} slots + a step of {Tb} exceed max_len={self.max_len}")
        if Tb > T:  # bucket padding: copies of the last input, marked invalid (they attend only to themselves)
            inputs = torch.cat([inputs, inputs[:, -1:].expand(B, Tb - T)], 1)
        qvalid = self._qvalid.get((Tb, T))
        if qvalid is None:
            qvalid = self._qvalid[(Tb, T)] = (torch.arange(Tb, device=inputs.device) < T).expand(B, Tb).contiguous()
        # The mask buffer mirrors the slot buffer; columns from ``seen`` on hold no committed token.
        kv = self._kvalid
        if seen:
            kv[:, :seen].copy_(state.valid)
        if self._kv_hi > seen:
            kv[:, seen:self._kv_hi].fill_(False)
        self._kv_hi = seen
        self._start.fill_(seen)
        fn = _step_fn(B, Tb, self.compile_backend, model=state.model)  # the server's model is never edited in place
        first = Tb not in self._warm
        t0 = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()
        try:
            scores, _ = fn(state.model, self._store, _no_processors, _SCORES, _StepIn(state.committed), inputs, qvalid, kv, self._start)
        except Exception as e:
            # Compiling happens before the step runs, so a compiler error leaves the cache as it was.
            if not is_compile_error(e):
                raise
            raise _CompileFailed(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        if first:
            if inputs.device.type == "cuda":
                torch.cuda.synchronize(inputs.device)
            self._warm.add(Tb)
            self._stats["warmup_s"] += time.perf_counter() - t0
            log.info("static serve step: width %d ready in %.1f s (compile or CUDA-graph capture)", Tb, time.perf_counter() - t0)
        self._stats["compiled_steps"] += 1
        if self._layout.window:  # the newest real position each row wrote (padding never lands in a ring)
            torch.maximum(self._high, state.committed + (T - 2), out=self._high)
        self._seen = seen + T
        # Graph outputs are overwritten by the next replay: keep a copy, without the bucket padding.
        return scores[:, :T].clone()

    def _fall_back(self, e: _CompileFailed) -> None:
        self._compiled = False
        self._stats["compiled"] = False
        self._stats["compile_fallback"] = str(e)
        msg = (f"decodekit serve: compiling the static cache's decode step failed ({e}); continuing with the eager "
               "forward (correct, slower). Serve with --no-compile to skip the attempt.")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _eager_forward(self, state: DecodeState, inputs: torch.Tensor) -> torch.Tensor:
        B, T = inputs.shape
        seen = self._seen
        self._stats["eager_steps"] += 1
        n = B if self._stable else self._active
        store = self._rows(n)
        store.kv_len = seen + T
        dev = inputs.device
        pos = (state.committed[:n] - 1)[:, None] + torch.arange(T, device=dev)  # [n, T]
        qvalid = self._ones.get((n, T))
        if qvalid is None:
            qvalid = self._ones[(n, T)] = torch.ones(n, T, dtype=torch.bool, device=dev)
        if T == 1:  # one query per row: it sees its committed slots and itself
            kv_valid = torch.cat([state.valid[:n], qvalid], 1)
        else:
            kv_valid = torch.cat([state.valid[:n], torch.zeros_like(qvalid)], 1)  # [n, seen + T]
        first_new = state.committed[:n] - 1 if self._layout.n_sliding else None
        with eager_attention(state.device):
            logits = run_model(state.model, store, inputs[:n], pos, qvalid, kv_valid, seen, first_new, T, self_filled=T == 1)
        if self._layout.window:
            self._high[:n] = torch.maximum(self._high[:n], pos[:, -1])
        self._seen = seen + T
        if n < B:  # free batch slots: finished rows, their scores are never read
            logits = torch.cat([logits, logits.new_zeros(B - n, *logits.shape[1:])], 0)
        return logits

    def keeps_holes(self) -> bool:
        """Rejected drafts stay as masked holes; :meth:`StaticBatch._make_room` compacts when the
        columns run out, so a step needs no host sync to trim them."""
        return True

    def cache_update(self, state: DecodeState) -> None:
        """Rejected slots beyond ``n_slots`` are simply overwritten by the next step."""
        self._seen = state.n_slots

    # ------------------------------------------------------------------ rows and columns
    def write_rows(self, rows: torch.Tensor, src: KVStore, col: int, width: int, high: torch.Tensor) -> None:
        """Copy a prefilled batch's KV (``src``, one row per entry of ``rows``) into batch slots
        ``rows``: full-layer slots ``[0, width)`` land at columns ``col ..``; rings are
        position-indexed and copied whole."""
        s = self._store
        if s.ring != src.ring:
            raise DecodekitError(f"prefill ring of {src.ring} entries does not match the static store's {s.ring}")
        rows = rows.to(s.device)
        for i, kind in enumerate(s.layout.kinds):
            for dst, new in ((s.keys, src.keys), (s.values, src.values)):
                if kind == FULL:
                    dst[i][rows, :, col:col + width] = new[i][:, :, :width].to(dst[i].dtype)
                else:
                    dst[i][rows] = new[i].to(dst[i].dtype)
        if s.ring_pos is not None:
            s.ring_pos[rows] = src.ring_pos
        self._high[rows] = high

    def compact(self, order: torch.Tensor) -> None:
        """Full-layer slot ``j`` of row ``b`` becomes old slot ``order[b, j]`` (``order`` ``[B, S']``)."""
        self._store.gather_slots(order)
        self._seen = order.shape[1]

    def check_rollback(self, state: DecodeState, m: torch.Tensor) -> None:
        """A rollback may reach back into positions a ring has overwritten: fail loudly rather than
        attend to a wrong window (one host sync, on rollback steps only)."""
        if not self._layout.window:
            return
        ahead = (self._high - (state.committed - 1)).masked_fill(m == 0, -1)  # [B]
        worst = int(ahead.max())
        if worst > self.max_depth:
            raise DecodekitError(
                f"a rollback reaches {worst} positions behind the newest key, deeper than the static cache's sliding "
                f"layers keep ({self.max_depth} beyond the window of {self._layout.window}); serve with --max-depth {worst} or more"
            )


def _no_processors(state: Any) -> None:
    """The compiled step's ``process``: the server's processors run per cohort, after it."""


class _Scores:
    """The compiled step's ``sampler``: it hands back the float32 logits ``[B, T, V]``."""

    def sample(self, state: Any) -> tuple[torch.Tensor, None]:
        return state.scores, None


_SCORES = _Scores()


class _StepIn:
    """What the compiled step reads of the batch (``committed`` [B]) and writes (``scores``): a
    small object, so the compiled code is guarded on one tensor rather than on the whole state."""

    def __init__(self, committed: torch.Tensor) -> None:
        self.committed = committed
        self.scores: torch.Tensor | None = None


@dataclass
class StaticBatch(Batch):
    """A :class:`~decodekit.batching.Batch` whose rows live in fixed batch slots of a
    :class:`StaticBatchCache` (``keys[r]`` is ``None`` for a free slot)."""

    max_batch: int = 16
    max_len: int = 2048
    max_depth: int = 16
    shape_stable: bool | None = None
    compile: bool | None = None
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cache = StaticBatchCache(max_batch=self.max_batch, max_len=self.max_len, max_depth=self.max_depth,
                                      shape_stable=self.shape_stable, compile=self.compile,
                                      compile_backend=self.compile_backend)
        self.state = self._idle_state()
        self.cache.setup(self.state)
        self.keys = [None] * self.max_batch
        self.compactions = 0

    def _idle_state(self) -> DecodeState:
        B, dev = self.max_batch, self.device
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        st = DecodeState(
            model=self.model, tokenizer=self.tokenizer, device=dev, batch_size=B, vocab_size=self.vocab,
            prompt_ids=[[] for _ in range(B)], prompt_lengths=zeros + 1, seeds=zeros.clone(), max_new_tokens=1,
            eos_token_ids=torch.tensor(self.eos, dtype=torch.long, device=dev), pad_token_id=self.pad,
        )
        st.tokens = torch.full((B, 0), self.pad, dtype=torch.long, device=dev)
        st.valid = torch.zeros((B, 0), dtype=torch.bool, device=dev)
        st.last, st.committed, st.n_new = zeros + self.pad, zeros + 1, zeros.clone()
        st.finished = torch.ones(B, dtype=torch.bool, device=dev)
        st.out_tokens = torch.zeros(B, 2, dtype=torch.long, device=dev)
        st.proposals = torch.zeros(B, 0, dtype=torch.long, device=dev)
        st.step_tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        st.accepted, st.rolled_back, st.n_matched = zeros.clone(), zeros.clone(), zeros.clone()
        self.max_new = zeros + 1
        self.eos_on = torch.ones(B, dtype=torch.bool, device=dev)
        self.read_upto = zeros.clone()
        return st

    def warmup(self) -> float:
        """Compile (or capture) the plain decode step now, on the idle batch, rather than on the first
        request; returns the seconds it took (0 without the compiled step). Call it in the thread and
        autograd mode that will step the batch (the compiled code is guarded on them)."""
        cache = self.cache
        if not cache._compiled or 1 in cache._warm:
            return 0.0
        t0 = time.perf_counter()
        st = self.state
        # Every row is a free slot: its query attends only to itself, its writes are never read.
        # On CUDA the first call compiles (and warms up the graph's memory pool), the second captures
        # the CUDA graph: both before the first request.
        for _ in range(2 if self.device.type == "cuda" else 1):
            cache.forward(st, st.last[:, None])
            cache.cache_update(st)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ admission
    def proposal_slots(self, strategy: Strategy) -> int:
        """Slots beyond the first that one step of ``strategy`` writes per row (drafter proposals,
        padded to the compiled step's width)."""
        return self.cache.step_width(1 + proposals_of(strategy)) - 1

    def check_fit(self, n_prompt: int, max_new_tokens: int, strategy: Strategy) -> None:
        """Raise (before any compute) if a request cannot fit a batch slot: its prompt, its
        ``max_new_tokens`` and one step's proposals must fit ``max_len`` slots."""
        k = self.proposal_slots(strategy)
        need = n_prompt + max_new_tokens + k
        if need > self.max_len:
            extra = f" + {k} proposal slots" if k else ""
            raise DecodekitError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_new_tokens}){extra} need {need} slots; the server's static "
                f"KV cache holds {self.max_len} per row (--max-len): lower max_tokens or shorten the prompt"
            )
        k = proposals_of(strategy)  # bucket padding never lands in a ring: only real proposals count here
        if self.cache._layout.window and k > self.max_depth:
            raise DecodekitError(
                f"the drafter proposes {k} tokens per step; the static cache's sliding layers keep {self.max_depth} beyond "
                f"the window (--max-depth): lower the drafter's k or raise --max-depth"
            )

    def join(self, specs: list[RowSpec]) -> None:
        free = self.keys.count(None)
        if len(specs) > free:
            raise DecodekitError(f"{len(specs)} rows do not fit: {free} of {self.max_batch} batch slots are free")
        for s in specs:
            self.check_fit(len(s.prompt_ids), s.max_new_tokens, s.strategy)
        super().join(specs)

    def _prefill_batch(self) -> Batch:
        # Rings as long as the static store's, so a prefilled row's ring is copied as it is.
        return Batch(self.model, self.tokenizer, cache=KVDynamicCache(max_rollback=self.max_depth))

    def _merge(self, new: Batch) -> None:
        st, b, dev = self.state, new.state, self.device
        free = [r for r, k in enumerate(self.keys) if k is None][: b.batch_size]
        rows = torch.tensor(free, dtype=torch.long, device=dev)
        S, w = st.n_slots, b.n_slots
        W = max(S, w)
        col = W - w  # right-aligned: the joiners' holes are in front, like a left-padded prompt
        # Slot buffer: the running rows gain W - S trailing holes (only if a joiner is longer than
        # the current width); the joiners' rows are rewritten whole.
        tokens = torch.full((b.batch_size, W), self.pad, dtype=torch.long, device=dev)
        valid = torch.zeros((b.batch_size, W), dtype=torch.bool, device=dev)
        tokens[:, col:], valid[:, col:] = b.tokens, b.valid
        if W > S:
            st.tokens = torch.cat([st.tokens, st.tokens.new_full((st.batch_size, W - S), self.pad)], 1)
            st.valid = torch.cat([st.valid, st.valid.new_zeros((st.batch_size, W - S))], 1)
        st.tokens, st.valid = st.tokens.index_copy(0, rows, tokens), st.valid.index_copy(0, rows, valid)
        for name in ("last", "committed", "n_new", "finished", "seeds", "prompt_lengths", "accepted", "rolled_back", "n_matched"):
            setattr(st, name, getattr(st, name).index_copy(0, rows, getattr(b, name)))
        for name in ("out_tokens", "step_tokens"):
            x, y = getattr(st, name), getattr(b, name)
            width = max(x.shape[1], y.shape[1])
            x, y = _fit(x, width), _fit(y, width)
            setattr(st, name, x.index_copy(0, rows, y))
        for j, r in enumerate(free):
            st.prompt_ids[r] = b.prompt_ids[j]
            self.keys[r] = new.keys[j]
        st.max_new_tokens = max(st.max_new_tokens, b.max_new_tokens)
        self.max_new = self.max_new.index_copy(0, rows, new.max_new)
        self.eos_on = self.eos_on.index_copy(0, rows, new.eos_on)
        self.read_upto = self.read_upto.index_copy(0, rows, new.read_upto)
        self._unread = max(self._unread, new._unread)
        # KV: only the joiners' entries are written (with the newest position each prefill wrote).
        self.cache.write_rows(rows, new.cache._store, col, w, new.cache._high)
        self.cache._seen = W
        for c in new.cohorts:
            c.offset += col
        self.cohorts = self.cohorts + new.cohorts
        self.errors.update(new.errors)
        self._occupied()
        self._reindex()

    def remove(self, keys: list[Hashable]) -> None:
        """Free the rows' batch slots: they finish and hold no valid slot; the next joiner reuses
        their memory. Nothing else moves."""
        gone = set(keys) & {k for k in self.keys if k is not None}
        if not gone:
            return
        self.settle()
        rows = [r for r, k in enumerate(self.keys) if k in gone]
        for r in rows:
            self.keys[r] = None
        for k in gone:
            self.errors.pop(k, None)
        st, i = self.state, torch.tensor(rows, dtype=torch.long, device=self.device)
        st.valid = st.valid.index_fill(0, i, False)
        st.finished = st.finished.index_fill(0, i, True)
        self._reindex()
        for c in [c for c in self.cohorts if not c.alive]:
            c.end()
        self.cohorts = [c for c in self.cohorts if c.alive]
        self._occupied()
        _trim(st)  # trailing columns that held only the freed rows' slots
        self.cache._seen = st.n_slots

    def _occupied(self) -> None:
        self.cache._active = max((r + 1 for r, k in enumerate(self.keys) if k is not None), default=0)

    # ------------------------------------------------------------------ columns
    def _make_room(self, T: int) -> None:
        """Compact when the next step's ``T`` slots would not fit ``max_len``: every row's valid
        slots are gathered to the right end of ``[0, width)`` (holes first, order kept), in the
        slot buffer and the full layers alike. Rings are position-indexed: untouched."""
        st = self.state
        S, T = st.n_slots, self.cache.step_width(T)
        if S + T <= self.max_len:
            return
        order = torch.sort(st.valid.to(torch.uint8), dim=1, stable=True).indices  # [B, S] holes first
        width = int(st.valid.sum(1).max())
        if width + T > self.max_len:  # pragma: no cover - check_fit admitted only rows that fit
            raise DecodekitError(f"static server cache is full: {width} committed slots + {T} do not fit max_len={self.max_len}")
        order = order[:, S - width:]
        self.cache.compact(order)
        st.tokens, st.valid = st.tokens.gather(1, order), st.valid.gather(1, order)
        # Cohort views now start at column 0 (the layout changed for every row alike, as a
        # StaticCache compaction changes it within one generation).
        for c in self.cohorts:
            c.offset = 0
        self.compactions += 1

    def _rolled_back(self, m: torch.Tensor) -> None:
        self.cache.check_rollback(self.state, m)


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[1] >= width else torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], 1)
