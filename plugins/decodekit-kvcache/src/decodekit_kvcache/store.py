"""The KV storage transformers writes into, and the one function that runs the model over it.

Two layouts, one per attention kind (see docs/plugins/kvcache.md):

* **full layers** are slot-indexed, ``[B, H_kv, capacity, D]``: slot ``j`` mirrors
  ``state.tokens[:, j]`` (holes from ragged acceptance included, masked). Rollback is moving the
  length pointer; rejected slots are overwritten by the next step (gpt-fast's ``input_pos``).
* **sliding layers** are position-indexed rings, ``[B, H_kv, R + 1, D]``: position ``p`` of a row
  lives at entry ``p % R``, so holes never enter a ring (compaction for free) and a window is
  always exactly ``window`` positions (transformers' sliding masks count *slots*, which is wrong
  as soon as a row has holes). Entry ``R`` is scratch for writes that must not land.

Masks are built here as 4D tensors from position ids (transformers uses a 4D mask as-is), one
per attention kind, so the cache owns its masking.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache as HFCache

from decodekit.components import cache_kwarg
from decodekit_kvcache.layout import FULL, SLIDING, Layout, round_up


# ---------------------------------------------------------------------------- buffer reuse
# A compiled step replays a CUDA graph recorded against the *addresses* of the buffers it mutates
# in place (marked static). A new generation with freshly allocated buffers would make
# torch.compile record the graph again (~20-40 ms for SmolLM2-135M on an H200, and after
# ``cudagraph_unexpected_rerecord_limit`` re-recordings it silently stops using graphs). So
# fixed-size buffers are leased from a pool and go back to it when their owner is garbage: the
# next generation of the same shapes gets the very same memory, and its graphs replay as they are.
#
# Bounded: per role only the buffers of one shape stay idle (a role that needs another shape drops
# the idle ones first), and only stores that replay CUDA graphs pool at all (``pooled``).
_FREE: dict[Any, dict[tuple, list[torch.Tensor]]] = {}   # role -> (shape, dtype, device, inference) -> idle
# Reentrant: a garbage collection inside the locked region may run a finalizer that gives back.
_LOCK = threading.RLock()


def lease(owner: Any, name: Any, shape: tuple[int, ...], dtype: torch.dtype, device: Any, fill: Any = 0,
          pooled: bool = True) -> torch.Tensor:
    """A tensor of ``shape`` filled with ``fill``, reused from a previous owner when one is idle;
    it returns to the pool when ``owner`` is garbage collected (or :func:`release` d). ``name``
    (the buffer's role, e.g. ``("keys", layer)``) picks the pool, so each role gets back the very
    address it had, whatever order buffers were returned in. ``pooled=False``: a plain allocation."""
    if not pooled:
        return torch.full(shape, fill, dtype=dtype, device=device)
    # An inference tensor (made under torch.inference_mode) cannot be written outside it, and a
    # normal one is not what inference mode hands out: one pool per mode.
    kind = (tuple(shape), dtype, torch.device(device), torch.is_inference_mode_enabled())
    t = None
    with _LOCK:
        idle = _FREE.setdefault(name, {})
        free = idle.get(kind)
        if free:
            t = free.pop()
        else:  # another shape's idle buffers of this role go before a new one is allocated
            for other in list(idle):
                if other != kind:
                    idle.pop(other, None)
    if t is None:
        t = torch.full(shape, fill, dtype=dtype, device=device)
    else:
        t.fill_(fill)
    owner.__dict__.setdefault("_leases", []).append(weakref.finalize(owner, _give_back, name, kind, t))
    return t


def _give_back(name: Any, kind: tuple, t: torch.Tensor) -> None:
    with _LOCK:
        idle = _FREE.setdefault(name, {})
        for other in list(idle):
            if other != kind:
                idle.pop(other, None)
        idle.setdefault(kind, []).append(t)


def release(owner: Any) -> None:
    """Return ``owner``'s leased buffers now (its generation is over; the owner must not touch
    them again), rather than whenever the garbage collector gets to it."""
    for fin in owner.__dict__.pop("_leases", ()):
        fin()


def free_buffers() -> int:
    """Drop every idle pooled buffer (memory goes back to torch's allocator); returns how many.
    Buffers in use are unaffected and return to the (now empty) pool later."""
    with _LOCK:
        n = sum(len(v) for idle in _FREE.values() for v in idle.values())
        _FREE.clear()
    return n


class KVStore(HFCache):
    """A ``transformers`` cache object whose layout decodekit owns.

    The model only calls :meth:`update` (``past_key_values.update(k, v, layer_idx)``); the plan of
    each forward (where the new keys go, how much to attend to) is set by :func:`run_model`.
    """

    def __init__(self, layout: Layout, batch: int, capacity: int, *, grow_block: int | None, ring: int) -> None:
        super().__init__(layers=[])
        self.layout, self.batch = layout, batch
        self.capacity = capacity            # full-layer slots allocated
        self.grow_block = grow_block        # None: static (never grows)
        self.ring = ring                    # R: ring entries per row (0 without sliding layers)
        n = len(layout.kinds)
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.ring_pos: torch.Tensor | None = None  # [B, R + 1] position held by each ring entry, -1 empty
        # plan of the current forward
        self.slots: torch.Tensor | None = None     # [Q] slots the queries write (full layers)
        self.ring_idx: torch.Tensor | None = None  # [B, Q] ring entry per query (R: scratch)
        self.kv_len = 0                             # full-layer slots attended this forward
        self.attn_impl: str | None = None           # the model's attention implementation (mask format)
        self.device: torch.device | None = None     # where the slot ids live (the model's input device)
        self._slot_ids: torch.Tensor | None = None
        #: Who this store serves, part of its pooled buffers' names (see :func:`lease`): a draft
        #: network's store of the same shapes must not swap buffers with the target's.
        self.pool_tag: str = "target"
        #: Lease the buffers from the pool (see :func:`lease`): only worth it, and only done, for
        #: stores whose compiled steps replay CUDA graphs against their addresses.
        self.pooled: bool = False

    # ----------------------------------------------------------- transformers' side
    def __len__(self) -> int:
        return len(self.layout.kinds)

    @property
    def is_sliding(self) -> list[bool]:
        return [k == SLIDING for k in self.layout.kinds]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Store this forward's keys/values (``[B, H_kv, Q, D]``) and return what to attend to."""
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states)
        K, V = self.keys[layer_idx], self.values[layer_idx]
        if self.layout.kinds[layer_idx] == FULL:
            K.index_copy_(2, self.slots, key_states)
            V.index_copy_(2, self.slots, value_states)
            return K[:, :, : self.kv_len], V[:, :, : self.kv_len]
        # Sliding: attend to the ring as it was plus all new keys (cat copies, so the in-place
        # ring write below cannot clobber a key an earlier query of this forward still needs).
        out_k, out_v = torch.cat([K, key_states], 2), torch.cat([V, value_states], 2)
        idx = self.ring_idx[:, None, :, None].expand_as(key_states)
        K.scatter_(2, idx, key_states)
        V.scatter_(2, idx, value_states)
        return out_k, out_v

    # ----------------------------------------------------------- decodekit's side
    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        B, H, _, D = like.shape
        n = self.capacity if self.layout.kinds[layer_idx] == FULL else self.ring + 1
        if self.grow_block is None:  # static: the same memory for every generation of these shapes
            self.keys[layer_idx] = lease(self, (self.pool_tag, "keys", layer_idx), (B, H, n, D), like.dtype, like.device,
                                         pooled=self.pooled)
            self.values[layer_idx] = lease(self, (self.pool_tag, "values", layer_idx), (B, H, n, D), like.dtype, like.device,
                                           pooled=self.pooled)
        else:
            self.keys[layer_idx] = like.new_zeros(B, H, n, D)
            self.values[layer_idx] = like.new_zeros(B, H, n, D)
        if torch.compiler.is_compiling():  # pragma: no cover - allocation happens in the eager prefill
            return
        # The compiled step mutates these in place; static addresses keep CUDA graphs valid.
        torch._dynamo.mark_static_address(self.keys[layer_idx])
        torch._dynamo.mark_static_address(self.values[layer_idx])

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` full-layer slots (dynamic caches grow in blocks; static ones
        were sized at setup and checked there)."""
        if slots <= self.capacity:
            return
        if self.grow_block is None:
            raise RuntimeError(f"static KV cache overflow: {slots} slots needed, {self.capacity} allocated")
        new = round_up(slots, self.grow_block)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None and self.layout.kinds[i] == FULL:
                    grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                    grown[:, :, : self.capacity] = t
                    store[i] = grown
        self.capacity = new

    def gather_slots(self, order: torch.Tensor) -> None:
        """Reorder full-layer slots per row (compaction): slot ``j`` of row ``b`` becomes old slot
        ``order[b, j]``; ``order`` is ``[B, S']``."""
        S = order.shape[1]
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None and self.layout.kinds[i] == FULL:
                    idx = order[:, None, :, None].expand(t.shape[0], t.shape[1], S, t.shape[3])
                    t[:, :, :S] = t.gather(2, idx)

    def slot_ids(self, start: int, n: int) -> torch.Tensor:
        """``arange(start, start + n)`` as a view of a kept ``arange`` (a view is cheaper than a
        new tensor, and this runs every step)."""
        ids = self._slot_ids
        if ids is None or start + n > ids.numel() or ids.device != self.device:
            ids = self._slot_ids = torch.arange(max(self.capacity, start + n), device=self.device)
        return ids.narrow(0, start, n)

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def _to_mask(ok: torch.Tensor, model: Any, impl: str | None = None) -> torch.Tensor:
    """transformers' own formats: boolean for SDPA (True = attend), additive float for eager."""
    if (impl or model.config._attn_implementation) == "eager":
        zero = torch.zeros((), dtype=model.dtype, device=ok.device)
        return torch.where(ok, zero, torch.finfo(model.dtype).min)
    return ok


def run_model(
    model: Any,
    store: KVStore,
    ids: torch.Tensor,
    pos: torch.Tensor,
    qvalid: torch.Tensor,
    kv_valid: torch.Tensor | None,
    start: int | torch.Tensor,
    first_new: torch.Tensor | None,
    keep: int,
    self_filled: bool = False,
) -> torch.Tensor:
    """One model call over ``Q`` queries per row; returns the logits of the last ``keep``.

    Args:
        ids, pos, qvalid: ``[B, Q]`` query tokens, their position ids, and which are real (holes
            and bucket padding are not: they attend only to themselves and never land in a ring).
        kv_valid: ``[B, L]`` full-layer slots that hold committed tokens (``L = store.kv_len``);
            the queries' own slots ``start .. start+Q-1`` are filled in here.
        start: first slot the queries write (an int, or a 0-dim tensor in the compiled step).
        first_new: ``[B]`` each row's first uncommitted position: ring entries at or beyond it are
            stale (rejected or rolled back) and masked, which makes ring rollback O(1). Needed
            only when the model has sliding layers.
        self_filled: with one query per row, ``kv_valid`` already marks the query's own slot
            (the caller built it that way for free), so the mask is ``kv_valid`` itself.
        kv_valid=None (full layers only, one query per row): every slot up to the query's own is
            attended, so no mask is needed; SDPA's unmasked kernel is the fastest there is.
    """
    B, Q = ids.shape
    dev = ids.device
    # [Q] the slots the queries write (one op when ``start`` is a host int; a tensor when compiled)
    slots = store.slot_ids(start, Q) if isinstance(start, int) else start + torch.arange(Q, device=dev)
    layout = store.layout
    masks: dict[str, torch.Tensor] = {}
    if kv_valid is None:
        assert Q == 1 and not layout.n_sliding, "an unmasked forward is for one query per row on full layers"
    elif layout.n_full and Q == 1:
        # One query per row (plain decoding): it sees the committed slots and itself; every
        # other slot is a hole or lies beyond it (kv_valid marks only committed slots, all before
        # ``start``). At most one op instead of the general build below (small models notice).
        kv = kv_valid if self_filled else kv_valid.index_fill(1, slots, True)
        masks[FULL] = _to_mask(kv[:, None, None, :], model, store.attn_impl)
    elif layout.n_full:
        q = torch.arange(Q, device=dev)
        L = kv_valid.shape[1]
        kv = kv_valid.index_copy(1, slots, qvalid)                 # [B, L]
        j = torch.arange(L, device=dev)
        causal = j[None, :] <= slots[:, None]                      # [Q, L]
        # A query always sees itself: a hole's row is then never all-masked (NaN in SDPA would
        # reach the cache and, times a zero weight, still poison real rows).
        ok = (kv[:, None, :] & causal) | (j[None, :] == slots[:, None])  # [B, Q, L]
        masks[FULL] = _to_mask(ok[:, None], model, store.attn_impl)
    ring_idx = None
    if layout.n_sliding:
        assert first_new is not None, "models with sliding layers need first_new"
        R, W = store.ring, layout.window
        q = torch.arange(Q, device=dev)
        if store.ring_pos is None:
            store.ring_pos = lease(store, (store.pool_tag, "ring_pos"), (B, R + 1), torch.long, dev, -1, pooled=store.pooled)
            torch._dynamo.mark_static_address(store.ring_pos)
        rp = store.ring_pos                                         # [B, R+1]
        near = pos[:, :, None] - rp[:, None, :] < W                # [B, Q, R+1]
        ring_ok = near & ((rp >= 0) & (rp < first_new[:, None]))[:, None, :]
        new_ok = qvalid[:, None, :] & (q[None, :] <= q[:, None]) & (pos[:, :, None] - pos[:, None, :] < W)
        new_ok = new_ok | torch.eye(Q, dtype=torch.bool, device=dev)
        masks[SLIDING] = _to_mask(torch.cat([ring_ok, new_ok], 2)[:, None], model, store.attn_impl)  # [B, 1, Q, R+1+Q]
        # Only the last R positions of a row can land (more would collide in the ring).
        top = pos.masked_fill(~qvalid, -1).amax(1, keepdim=True)
        land = qvalid & (pos > top - R)
        ring_idx = torch.where(land, pos % R, R)                   # [B, Q]
    store.slots, store.ring_idx = slots, ring_idx
    mask: Any = masks if len(masks) > 1 else next(iter(masks.values()), None)
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, **{cache_kwarg(model): store}, use_cache=True,
                logits_to_keep=keep)
    if ring_idx is not None:
        store.ring_pos.scatter_(1, ring_idx, pos)
        store.ring_pos[:, -1] = -1                                  # scratch never holds a position
    logits = out.logits
    return logits if logits.shape[1] == keep else logits[:, -keep:]
