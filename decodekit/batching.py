"""Continuous batching: rows join and leave a running generation between steps.

:func:`decodekit.loop.run` decodes a fixed batch. A server wants more: requests arrive while
others decode and leave when done (or when their client hangs up), and each picks its own strategy.
:class:`Batch` keeps one shared :class:`~decodekit.DecodeState` (slot buffer + one KV cache) for all
rows, and reuses the loop's pieces (``Cache.forward``, :func:`decodekit.verify.verify`,
``_apply_rollback``, ``_trim``) for one step at a time (Yu et al. 2022, "Orca: iteration-level
scheduling").

* **Join** (:meth:`Batch.join`): new rows are prefilled in a batch of their own (one forward), then
  concatenated to the running batch: slot buffers and KV tensors are left-padded with masked holes
  to a common width, exactly like a left-padded prompt, so nothing is recomputed.
* **Leave** (:meth:`Batch.remove`): the row's KV entries and slots are dropped (``index_select`` on
  the batch dimension); leading columns no row uses any more are cut.
* **Read** (:meth:`Batch.poll`): every row's new tokens, counts and finished flags in one host sync
  (the step itself syncs only after a rollback, to trim), so a server streams with one sync per step.
* **Per-request strategies**: rows admitted together with the same strategy form a
  :class:`Cohort`, which owns one set of component instances set up for exactly its rows. Every
  step the cohort's components see a *view* state (its rows gathered from the shared state, its own
  slot columns), so processors stay batch-first inside a cohort and components need no notion of
  rows joining. Rows of a cohort that left become *ghosts* in its view: finished rows whose values
  no longer change, which every component already handles. All cohorts share one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from decodekit.components import Cache
from decodekit.errors import DecodekitError
from decodekit.loop import _apply_rollback, _call, _commit, _eos_ids, _trim, run_processors
from decodekit.plugins import get_plugin_manager
from decodekit.state import DecodeState, Proposal
from decodekit.strategy import Strategy
from decodekit.verify import verify

Fns = tuple[tuple[str, Callable], ...]


@dataclass
class RowSpec:
    """One row to add: what a request asks for."""

    key: Hashable                 # the caller's handle for the row
    prompt_ids: list[int]
    strategy: Strategy
    max_new_tokens: int
    seed: int                     # the row's rng seed (decodekit.rng), already per row


def row_seed(seed: int, row: int = 0) -> int:
    """The seed ``decodekit.generate(..., seed=seed)`` gives row ``row``: a request served in a
    batch samples exactly what it samples alone."""
    return (seed * 1_000_003 + row) % (1 << 62)


def strategy_key(strategy: Strategy) -> str:
    """Rows whose strategies serialise alike can share components (a cohort)."""
    try:
        return strategy.to_json(sort_keys=True)
    except DecodekitError:
        return f"object:{id(strategy)}"  # Python-only components (HFProcessor): never shared


class BatchCache(Cache):
    """A dynamic KV cache whose rows can be added and removed between steps.

    Owned by the :class:`Batch`, not by a strategy: all rows share it. The model call is the core's
    ``Cache.forward``; this class adds the batch-dimension surgery."""

    def setup(self, state: DecodeState) -> None:
        from transformers import DynamicCache

        self._seen = 0
        # No config on purpose: full layers everywhere, so a row's slots can be cropped, padded
        # and concatenated on any architecture (sliding windows are still applied by the mask).
        self._kv = DynamicCache()

    def past_key_values(self) -> Any:
        return self._kv

    def _layers(self) -> list[Any]:
        kv = getattr(self, "_kv", None)  # None before setup (an empty batch)
        return [] if kv is None else [layer for layer in kv.layers if getattr(layer, "is_initialized", False) and layer.keys.numel()]

    def cache_update(self, state: DecodeState) -> None:
        n = state.n_slots
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        self._seen = n

    def select(self, rows: torch.Tensor) -> None:
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows.to(layer.keys.device)], layer.values[rows.to(layer.values.device)]

    def drop_front(self, q: int) -> None:
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[..., q:, :], layer.values[..., q:, :]
        self._seen -= q

    def pad_front(self, p: int) -> None:
        if p == 0:
            return
        for layer in self._layers():
            # [B, H, S, D]: p masked slots in front, never attended to.
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], p, layer.keys.shape[3])
            layer.keys = torch.cat([pad, layer.keys], 2)
            pad = layer.values.new_zeros(*layer.values.shape[:2], p, layer.values.shape[3])
            layer.values = torch.cat([pad, layer.values], 2)
        self._seen += p

    def extend(self, other: "BatchCache") -> None:
        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise DecodekitError(f"cannot merge KV caches with {len(mine)} and {len(theirs)} layers")
        for a, b in zip(mine, theirs):
            a.keys, a.values = torch.cat([a.keys, b.keys], 0), torch.cat([a.values, b.values], 0)

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self._layers() for t in (layer.keys, layer.values))


# ------------------------------------------------------------------------------------ cohorts
def _fit(old: torch.Tensor, width: int, fill: Any) -> torch.Tensor:
    """``old`` [B, W] cropped or right-padded with ``fill`` to ``width`` columns."""
    if old.shape[1] >= width:
        return old[:, :width]
    return torch.cat([old, old.new_full((old.shape[0], width - old.shape[1]), fill)], 1)


def _keep(old: torch.Tensor | None, new: torch.Tensor, ghost: torch.Tensor, fill: Any = 0) -> torch.Tensor:
    """``new`` with ghost rows frozen at ``old`` (a finished row never changes again)."""
    if old is None or old.shape[0] != new.shape[0]:
        return new
    if new.dim() == 2:
        old = _fit(old, new.shape[1], fill)
        return torch.where(ghost[:, None], old, new)
    return torch.where(ghost, old, new)


class Cohort:
    """Rows admitted together with the same strategy: one set of components, one view state."""

    def __init__(self, strategy: Strategy, keys: list[Hashable], view: DecodeState, offset: int) -> None:
        pm = get_plugin_manager()
        _, self.processors, self.sampler, self.drafter = strategy.resolved()
        self.strategy, self.keys, self.view, self.offset = strategy, list(keys), view, offset
        comps = [*self.processors, self.sampler] + ([self.drafter] if self.drafter else [])

        def resolve(hook: str, owners: list) -> Fns:
            own = tuple((f"{type(c).__name__}.{hook}", getattr(c, hook)) for c in owners if callable(getattr(c, hook, None)))
            return own + pm.per_token(hook)

        self.pre = resolve("pre_logits", [self.drafter] if self.drafter else [])
        self.proc = resolve("process_logits", self.processors)
        self.acc = resolve("accept", comps)
        self.k_max = self.drafter.max_proposals() if self.drafter else 0
        view.extras["strategy"] = strategy
        if not strategy.stop_at_eos:
            view.eos_token_ids = view.eos_token_ids[:0]
        view.proposals = view.tokens.new_zeros(view.batch_size, 0)
        for c in comps:
            c.setup(view)
        pm.call("decodekit_generation_start", state=view)
        self.idx = torch.zeros(0, dtype=torch.long)
        self.ghost = torch.zeros(0, dtype=torch.bool)
        self.has_ghosts, self.n_live = False, 0
        self.stale = False  # the view lags the shared state by the last commit (no accept hook needed it)
        self.proposal: Proposal | None = None
        self.ended = False

    def index(self, row_of: dict[Hashable, int], device: torch.device) -> None:
        """Map the cohort's members to shared rows (ghosts to row 0; their values are frozen)."""
        self.idx = torch.tensor([row_of.get(k, 0) for k in self.keys], dtype=torch.long, device=device)
        self.ghost = torch.tensor([k not in row_of for k in self.keys], dtype=torch.bool, device=device)
        self.n_live = sum(k in row_of for k in self.keys)  # known on the host: no sync
        self.has_ghosts = self.n_live < len(self.keys)
        self.live_pos = (~self.ghost).nonzero()[:, 0]  # positions in the view of live members
        self.rows = self.idx[self.live_pos]            # their shared rows

    @property
    def alive(self) -> bool:
        return self.n_live > 0

    def refresh(self, st: DecodeState) -> None:
        """Copy the shared state of the cohort's rows into its view (host-sync free)."""
        v, i, g, off = self.view, self.idx, self.ghost, self.offset
        self.stale = False
        if not self.has_ghosts:  # every member is live: plain gathers (this runs per cohort per step)
            v.tokens, v.valid = st.tokens[i, off:], st.valid[i, off:]
            v.last, v.committed, v.n_new = st.last[i], st.committed[i], st.n_new[i]
            v.out_tokens, v.finished = st.out_tokens[i], st.finished[i]
        else:
            v.tokens = _keep(v.tokens, st.tokens[i, off:], g, st.pad_token_id)
            v.valid = _keep(v.valid, st.valid[i, off:], g, False)
            v.last = _keep(v.last, st.last[i], g)
            v.committed = _keep(v.committed, st.committed[i], g)
            v.n_new = _keep(v.n_new, st.n_new[i], g)
            v.out_tokens = _keep(v.out_tokens, st.out_tokens[i], g)
            v.finished = st.finished[i] | g
        v.step, v.forward_passes = st.step, st.forward_passes
        if st.accepted is not None:
            v.step_tokens = st.step_tokens[i]
            if not self.has_ghosts:
                v.accepted, v.rolled_back, v.n_matched = st.accepted[i], st.rolled_back[i], st.n_matched[i]
            else:
                v.accepted = st.accepted[i].masked_fill(g, 0)
                v.rolled_back = st.rolled_back[i].masked_fill(g, 0)
                v.n_matched = st.n_matched[i].masked_fill(g, 0)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            for c in [*self.processors, self.sampler] + ([self.drafter] if self.drafter else []):
                c.teardown(self.view)
            get_plugin_manager().call("decodekit_generation_end", state=self.view)


def _commit_rows(st: DecodeState, inputs: torch.Tensor, n: torch.Tensor, nxt: torch.Tensor,
                 max_new: torch.Tensor, eos_on: torch.Tensor, cap: int) -> None:
    """:func:`decodekit.loop._commit` with a per-row token budget ``max_new`` [B] and per-row EOS
    switch ``eos_on`` [B] (requests differ in ``max_tokens`` and ``stop_at_eos``)."""
    _commit(st, inputs, n, nxt, max_new=max_new, eos_on=eos_on, cap=cap)


@dataclass
class Batch:
    """A running generation whose rows change between steps.

    Use :meth:`join` to add rows (prefills them and commits their first token), :meth:`step` to
    decode one step for every row, :meth:`remove` to drop rows (finished, cancelled).
    ``errors`` maps a row's key to the exception its strategy raised; such rows are finished.
    """

    model: Any
    tokenizer: Any
    state: DecodeState | None = None
    cache: BatchCache = field(default_factory=BatchCache)
    keys: list[Hashable] = field(default_factory=list)
    cohorts: list[Cohort] = field(default_factory=list)
    max_new: torch.Tensor | None = None    # [B] per-row token budget
    eos_on: torch.Tensor | None = None     # [B] per-row stop_at_eos
    read_upto: torch.Tensor | None = None  # [B] tokens per row that :meth:`poll` has returned
    errors: dict[Hashable, BaseException] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = self.model.get_input_embeddings().weight.device
        self._unread = 0  # the most tokens a row can have committed since the last poll (host-side bound)
        self.eos = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else (self.eos[0] if self.eos else 0))
        cfg = self.model.config
        self.vocab = int(getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "vocab_size", None) or len(self.tokenizer))

    def __len__(self) -> int:
        # ``None`` marks a free batch slot (only in batches whose rows stay put, see decodekit-serve's StaticBatch)
        return sum(k is not None for k in self.keys)

    # ------------------------------------------------------------------ building
    def _state(self, ids: list[list[int]], seeds: list[int], max_new: int) -> DecodeState:
        """A left-padded initial state, as :func:`decodekit.loop.prepare` builds one."""
        B, P, dev = len(ids), max(len(x) for x in ids), self.device
        grid = torch.full((B, P), self.pad, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.bool)
        for r, x in enumerate(ids):
            grid[r, P - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[r, P - len(x):] = True
        grid, mask = grid.to(dev), mask.to(dev)
        st = DecodeState(
            model=self.model, tokenizer=self.tokenizer, device=dev, batch_size=B, vocab_size=self.vocab,
            prompt_ids=[list(x) for x in ids], prompt_lengths=torch.tensor([len(x) for x in ids], device=dev),
            seeds=torch.tensor(seeds, dtype=torch.long, device=dev), max_new_tokens=max_new,
            eos_token_ids=torch.tensor(self.eos, dtype=torch.long, device=dev), pad_token_id=self.pad,
        )
        st.tokens, st.valid = grid[:, : P - 1], mask[:, : P - 1]
        st.last = grid[:, P - 1].clone()
        st.committed = st.prompt_lengths.clone()
        st.n_new = torch.zeros(B, dtype=torch.long, device=dev)
        st.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        st.out_tokens = torch.zeros(B, max_new + 1, dtype=torch.long, device=dev)
        st.proposals = torch.zeros(B, 0, dtype=torch.long, device=dev)
        return st

    def _view(self, rows: list[int]) -> DecodeState:
        st = self.state
        i = torch.tensor(rows, dtype=torch.long, device=self.device)
        v = self._state([st.prompt_ids[r] for r in rows], st.seeds[i].tolist(), int(self.max_new[i].max()))
        v.tokens, v.valid = st.tokens[i], st.valid[i]  # same columns as the shared state at creation
        return v

    def _reindex(self) -> None:
        row_of = {k: r for r, k in enumerate(self.keys) if k is not None}
        for c in self.cohorts:
            c.index(row_of, self.device)

    # ------------------------------------------------------------------ hooks for other layouts
    # A batch whose rows stay in fixed batch slots of a preallocated cache (decodekit-serve's
    # StaticBatch) overrides these; the dynamic batch needs none of them.
    def _prefill_batch(self) -> "Batch":
        """An empty batch whose cache prefills joining rows (merged by :meth:`_merge`)."""
        return Batch(self.model, self.tokenizer)

    def _make_room(self, T: int) -> None:
        """Called before each step, which writes up to ``T`` slots per row (the dynamic cache grows)."""

    def _rolled_back(self, m: torch.Tensor) -> None:
        """Called after rows were rolled back by ``m`` [B] tokens."""

    # ------------------------------------------------------------------ join / leave
    def join(self, specs: list[RowSpec]) -> None:
        """Add rows: prefill them together (their first token is committed), then merge them into
        the running batch. A strategy that fails in ``setup`` raises before anything changes."""
        if not specs:
            return
        for s in specs:
            if s.strategy.cache is not None:
                raise DecodekitError(
                    f"row {s.key!r}: strategy.cache is {s.strategy.cache.component_name()!r}, but rows of a continuous "
                    "batch share the batch's own KV cache; leave strategy.cache unset"
                )
            if s.max_new_tokens < 1:
                raise DecodekitError(f"row {s.key!r}: max_new_tokens must be >= 1, got {s.max_new_tokens}")
        new = self._prefill_batch()
        new.keys = [s.key for s in specs]
        new.state = new._state([s.prompt_ids for s in specs], [s.seed for s in specs], max(s.max_new_tokens for s in specs))
        new.max_new = torch.tensor([s.max_new_tokens for s in specs], dtype=torch.long, device=self.device)
        new.eos_on = torch.tensor([s.strategy.stop_at_eos for s in specs], dtype=torch.bool, device=self.device)
        new.read_upto = torch.zeros(len(specs), dtype=torch.long, device=self.device)
        new.cache.setup(new.state)
        groups: dict[str, list[int]] = {}
        for r, s in enumerate(specs):
            groups.setdefault(strategy_key(s.strategy), []).append(r)
        for rows in groups.values():
            new.cohorts.append(Cohort(specs[rows[0]].strategy, [specs[r].key for r in rows], new._view(rows), 0))
        new._reindex()
        new.step()  # prefill: the cache has seen no slot, so this forward covers the prompts
        self._merge(new)

    def _merge(self, new: "Batch") -> None:
        if self.state is None:
            self.__dict__.update({k: getattr(new, k) for k in ("state", "cache", "keys", "cohorts", "max_new", "eos_on",
                                                                "read_upto", "_unread")})
            self.errors.update(new.errors)
            return
        a, b = self.state, new.state
        S = max(a.n_slots, b.n_slots)
        for side, batch in ((a, self), (b, new)):
            p = S - side.n_slots
            if p:  # masked holes in front, like left padding of a prompt
                side.tokens = torch.cat([side.tokens.new_full((side.batch_size, p), self.pad), side.tokens], 1)
                side.valid = torch.cat([side.valid.new_zeros((side.batch_size, p)), side.valid], 1)
                batch.cache.pad_front(p)
                for c in batch.cohorts:
                    c.offset += p
        self.cache.extend(new.cache)
        width = max(a.out_tokens.shape[1], b.out_tokens.shape[1])
        a.out_tokens = torch.cat([_fit(a.out_tokens, width, 0), _fit(b.out_tokens, width, 0)], 0)
        for name in ("tokens", "valid", "last", "committed", "n_new", "finished", "seeds", "prompt_lengths",
                     "step_tokens", "accepted", "rolled_back", "n_matched"):
            x, y = getattr(a, name), getattr(b, name)
            if name == "step_tokens":
                T = max(x.shape[1], y.shape[1])
                x, y = _fit(x, T, 0), _fit(y, T, 0)
            setattr(a, name, torch.cat([x, y], 0))
        a.prompt_ids = a.prompt_ids + b.prompt_ids
        a.batch_size = len(a.prompt_ids)
        a.max_new_tokens = max(a.max_new_tokens, b.max_new_tokens)
        self.max_new = torch.cat([self.max_new, new.max_new])
        self.eos_on = torch.cat([self.eos_on, new.eos_on])
        self.read_upto = torch.cat([self.read_upto, new.read_upto])
        self._unread = max(self._unread, new._unread)
        self.keys = self.keys + new.keys
        self.cohorts = self.cohorts + new.cohorts
        self.errors.update(new.errors)
        self._reindex()

    def settle(self) -> None:
        """Bring views that skipped the accept-time refresh up to date (before rows leave: their
        ghosts freeze at what the view holds, and ``generation_end`` hooks read it)."""
        for c in self.cohorts:
            if c.stale:
                c.refresh(self.state)

    def remove(self, keys: list[Hashable]) -> None:
        """Drop rows (and free their KV cache rows); ending cohorts whose rows are all gone."""
        gone = set(keys) & set(self.keys)
        if not gone:
            return
        self.settle()
        keep = [r for r, k in enumerate(self.keys) if k not in gone]
        self.keys = [self.keys[r] for r in keep]
        for k in gone:
            self.errors.pop(k, None)
        if not keep:
            for c in self.cohorts:
                c.end()
            self.state, self.cohorts, self.cache = None, [], BatchCache()
            return
        st, i = self.state, torch.tensor(keep, dtype=torch.long, device=self.device)
        for name in ("tokens", "valid", "last", "committed", "n_new", "finished", "seeds", "prompt_lengths",
                     "out_tokens", "step_tokens", "accepted", "rolled_back", "n_matched"):
            setattr(st, name, getattr(st, name)[i])
        st.prompt_ids = [st.prompt_ids[r] for r in keep]
        st.batch_size = len(keep)
        self.max_new, self.eos_on, self.read_upto = self.max_new[i], self.eos_on[i], self.read_upto[i]
        self.cache.select(i)
        self._reindex()
        for c in [c for c in self.cohorts if not c.alive]:
            c.end()
        self.cohorts = [c for c in self.cohorts if c.alive]
        # Cut leading columns no row uses and no cohort view starts before (views keep their layout).
        used = st.valid.any(0)
        q = int(used.long().argmax()) if bool(used.any()) else st.n_slots
        q = min([q] + [c.offset for c in self.cohorts])
        if q:
            st.tokens, st.valid = st.tokens[:, q:], st.valid[:, q:]
            self.cache.drop_front(q)
            for c in self.cohorts:
                c.offset -= q

    # ------------------------------------------------------------------ one step
    def _fail(self, c: Cohort, e: BaseException) -> None:
        for k in (self.keys[r] for r in c.rows.tolist()):
            self.errors[k] = e
        self.state.finished[c.rows] = True

    def step(self) -> DecodeState:
        """One decode step for every row: pre-logits per cohort, one shared forward, processors,
        sampling and verification per cohort, one commit, accept per cohort, cache update."""
        # Room for this step's slots (a fixed-width cache may compact its columns first).
        self._make_room(1 + max((c.k_max for c in self.cohorts), default=0))
        st = self.state
        B, dev = st.batch_size, self.device
        for c in self.cohorts:
            c.refresh(st)
        # pre-logits: each cohort's drafter proposes for its rows; T = 1 + the longest proposal
        props: list[Proposal | None] = []
        for c in self.cohorts:
            p = None
            if c.pre and c.n_live:  # host-known (reading view.finished would be a sync per cohort)
                try:
                    for label, fn in c.pre:
                        p = fn(c.view)
                        if p is not None:
                            break
                except Exception as e:
                    e.add_note(f"decodekit: raised in {label}")
                    self._fail(c, e)
                    p = None
            props.append(p if p is not None and p.tokens.shape[1] > 0 else None)
        k = max([p.tokens.shape[1] for p in props if p is not None], default=0)
        st.proposals = torch.zeros(B, k, dtype=torch.long, device=dev)
        st.n_proposed = torch.zeros(B, dtype=torch.long, device=dev)
        for c, p in zip(self.cohorts, props):
            if p is not None:
                kc = p.tokens.shape[1]
                st.proposals[c.rows, :kc] = p.tokens.to(dev, torch.long)[c.live_pos]
                lengths = p.lengths.to(dev) if p.lengths is not None else torch.full((c.view.batch_size,), kc, device=dev)
                st.n_proposed[c.rows] = lengths.clamp(0, kc)[c.live_pos]
        st.n_proposed = st.n_proposed.masked_fill(st.finished, 0)
        # forward: one model call over every row and every proposed position
        inputs = torch.cat([st.last[:, None], st.proposals], 1)  # [B, T]
        self._unread += inputs.shape[1]
        st.scores = self.cache.forward(st, inputs).to(dev, torch.float32)  # [B, T, V]
        st.forward_passes += 1
        # process-logits, select, verify: per cohort, batch-first inside it
        n = torch.zeros(B, dtype=torch.long, device=dev)
        nxt = torch.zeros(B, dtype=torch.long, device=dev)
        for c, p in zip(self.cohorts, props):
            v = c.view
            v.proposals, v.n_proposed = st.proposals[c.idx], st.n_proposed[c.idx].masked_fill(c.ghost, 0)
            v.scores = st.scores[c.idx]
            v.proposal = None
            if p is not None:
                probs = p.probs
                if probs is not None and probs.shape[1] < k:  # beyond n_proposed: never read
                    probs = torch.cat([probs, probs.new_zeros(probs.shape[0], k - probs.shape[1], probs.shape[2])], 1)
                v.proposal = Proposal(tokens=v.proposals, probs=probs, lengths=v.n_proposed)
            try:
                run_processors(c.proc, v)
                target, probs = c.sampler.sample(v)
                n_c, nxt_c = verify(v, target, probs, v.proposal)
            except Exception as e:
                self._fail(c, e)
                continue
            n[c.rows], nxt[c.rows] = n_c[c.live_pos], nxt_c[c.live_pos]
        st.n_matched = n.masked_fill(st.finished, 0)
        _commit_rows(st, inputs, st.n_matched, nxt, self.max_new, self.eos_on, int(st.max_new_tokens))
        # accept/rollback per cohort; a rollback request is mapped back to the shared rows
        rollback = None
        for c in self._accept_all():
            if c.view._rollback is not None:
                m = torch.zeros(B, dtype=torch.long, device=dev)
                m[c.rows] = c.view._rollback.to(dev)[c.live_pos]
                c.view._rollback = None
                rollback = m if rollback is None else torch.maximum(rollback, m)
        if rollback is not None:
            before = st.finished
            _apply_rollback(st, rollback)
            st.finished = st.finished | (st.n_new >= self.max_new) | (before & (rollback == 0))
            self._rolled_back(rollback)
            for c in self._accept_all():
                c.view._rollback = None
        # A rollback, or proposals that no row accepted in full, leave trailing columns that are
        # holes in every row (a plain step cannot: finished rows append holes only next to live
        # rows' slots). Trimming them costs a host sync; a cache that keeps holes and compacts when
        # full (the server's static batch: Cache.keeps_holes) saves it, a growing one must trim or
        # its KV and attention width grow by the whole verify width every step.
        if rollback is not None or (k and not self.cache.keeps_holes()):
            _trim(st)
        self.cache.cache_update(st)
        st.step += 1
        return st

    def _accept_all(self) -> list[Cohort]:
        done = []
        for c in self.cohorts:
            if not c.acc:  # no component listens: the view catches up at the next refresh (or settle)
                c.stale = True
                done.append(c)
                continue
            c.refresh(self.state)
            try:
                _call(c.acc, c.view)
            except Exception as e:
                self._fail(c, e)
                continue
            done.append(c)
        return done

    # ------------------------------------------------------------------ reading results
    def poll(self) -> dict[Hashable, tuple[int, list[int], bool]]:
        """Per live row ``(lo, tokens, finished)``: the row's committed tokens are now those the
        previous poll left it with, cut to ``lo``, followed by ``tokens`` (a rollback only removes
        from the end). Reads only the columns the steps since the last poll can have written (at
        most their widths summed), with ``n_new`` and ``finished``, in one host sync: the server's
        only one per step."""
        st = self.state
        if st is None:
            return {}
        U = min(self._unread, st.out_tokens.shape[1])
        cols = (self.read_upto[:, None] + torch.arange(U, device=self.device)).clamp_(max=st.out_tokens.shape[1] - 1)
        rows = torch.cat([self.read_upto[:, None], st.n_new[:, None], st.finished[:, None].long(),
                          st.out_tokens.gather(1, cols)], 1).tolist()
        self.read_upto = st.n_new.clone()
        self._unread = 0
        out = {}
        for key, (seen, n, fin, *window) in zip(self.keys, rows):
            if key is None:
                continue
            if n - seen > U:  # pragma: no cover - _unread bounds what a row commits between polls
                raise DecodekitError(f"row {key!r} committed {n - seen} tokens since the last poll, more than the {U} read")
            out[key] = (min(seen, n), window[: max(n - seen, 0)], bool(fin))
        return out

    def new_tokens(self, since: dict[Hashable, int]) -> dict[Hashable, tuple[int, list[int]]]:
        """Per row ``(lo, tokens[lo:])``: its new tokens from index ``lo`` on, where ``lo`` is at most
        ``since[key]`` (tokens the caller already holds) and no earlier token can have changed since
        (a rollback only removes from the end). Reads only those columns; two host syncs."""
        st = self.state
        n_new = st.n_new.tolist()
        live = [(k, n) for k, n in zip(self.keys, n_new) if k is not None]
        lo = min([min(since.get(k, 0), n) for k, n in live], default=0)
        hi = max([n for _, n in live], default=0)
        part = st.out_tokens[:, lo:hi].tolist()
        return {k: (lo, row[: n - lo]) for k, row, n in zip(self.keys, part, n_new) if k is not None}
