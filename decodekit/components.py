"""Component base classes and the core's own components (the default plugin).

A component is a small pydantic model: its fields are its configuration (validated, JSON-able),
its per-generation working state lives in private attributes set up in :meth:`Component.setup`.
Per-token methods (``pre_logits``, ``process_logits``, ``accept``, ``cache_update``) have the
signatures of the matching hooks in :mod:`decodekit.hookspecs`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from decodekit.state import DecodeState

Kind = Literal["cache", "processor", "sampler", "drafter"]


class Component(BaseModel):
    """Base of every strategy component.

    Subclasses set ``kind`` and implement the per-token methods they need; a method left
    undefined costs nothing (it is not resolved into the loop).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    kind: ClassVar[Kind]
    #: Name in JSON strategies; defaults to the class name.
    name: ClassVar[str | None] = None

    @classmethod
    def component_name(cls) -> str:
        return cls.name or cls.__name__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A single positional value fills the first declared field: ``TopK(50)``.
        if args:
            if len(args) > 1:
                raise TypeError(f"{type(self).__name__} takes at most one positional value, got {len(args)}")
            fields = list(type(self).model_fields)
            if not fields:
                raise TypeError(f"{type(self).__name__} takes no configuration")
            kwargs = {fields[0]: args[0], **kwargs}
        super().__init__(**kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # Working state (underscore names not declared as pydantic PrivateAttr) is plain instance
        # data, some of it set every step: pydantic's validating __setattr__ costs microseconds.
        if name[0] == "_" and name not in type(self).__private_attributes__:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def setup(self, state: DecodeState) -> None:
        """Reset per-generation working state (called once before prefill)."""

    def teardown(self, state: DecodeState) -> None:
        """The generation is over (finished, interrupted or failed): hand back what ``setup`` took
        that others could reuse now. Called once, after the last step; the component must not
        touch those resources again until its next ``setup``."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.component_name(), **self.model_dump(mode="json")}


class Processor(Component):
    """Turns ``state.scores`` ``[B, T, V]`` into new scores (see ``decodekit_process_logits``)."""

    kind: ClassVar[Kind] = "processor"

    def process_logits(self, state: DecodeState) -> torch.Tensor | None:  # pragma: no cover
        raise NotImplementedError


class Sampler(Component):
    """Picks the token at every verified position.

    ``sample`` returns ``(tokens [B, T], probs [B, T, V] | None)``; ``probs`` is ``None`` for a
    deterministic sampler (greedy), otherwise the exact distribution sampled from, which lossless
    speculative verification needs.
    """

    kind: ClassVar[Kind] = "sampler"

    def sample(self, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError


class Drafter(Component):
    """Proposes tokens for the target model to verify (see ``decodekit_pre_logits``)."""

    kind: ClassVar[Kind] = "drafter"

    #: Deepest rollback this drafter can cause (caches with bounded windows keep this many extra).
    def max_proposals(self) -> int:
        return int(getattr(self, "k", 0))


#: The forward's keyword for the KV cache, per model class. transformers renamed
#: ``past_key_values`` to ``cache`` in 5.2x (the old name warns on every call and goes in 5.40);
#: remote-code models may still only know the old one.
_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """``"cache"`` if ``model``'s forward takes it, else ``"past_key_values"``. Memoised per class;
    call it once outside compiled code (it reads a signature) before a compiled step uses it."""
    cls = type(model)
    name = _CACHE_KWARG.get(cls)
    if name is None:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):  # a forward without a readable signature: the old name
            params = {}
        name = _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return name


def eager_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA kernels an eager forward may use: on CUDA every backend but cuDNN's.

    cuDNN attention builds an execution plan per new sequence length: the first forward of a prompt
    length not seen before cost 87 ms instead of 25 for SmolLM2-135M on an H200 (flash: 29 ms;
    ``benchmarks/prefill_attention_gpu.py``). Eager forwards are the prefills (a new length almost
    every request: a server's time to first token) and dynamic-cache steps (a new KV length every
    step). Flash and memory-efficient kernels have no per-shape setup; the math kernel is the
    fallback that always exists. Compiled steps are traced once per shape and are left alone."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def slot_attention_mask(model: Any, valid: torch.Tensor, positions: torch.Tensor, n_query: int) -> Any:
    """The ``attention_mask`` for a forward over slots that may hold holes.

    Args:
        valid: ``[B, K]`` bool, every slot the attention sees (cached + this call's ``n_query``).
        positions: ``[B, K]`` position ids of those slots (holes: anything).
    Returns the usual 2D mask, except for sliding-window models at batch > 1: transformers measures
    the window in slots, and a hole (ragged speculative acceptance) would shrink it, so those get 4D
    masks with the window measured in positions (a dict per layer type for hybrid models).
    """
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    window = getattr(cfg, "sliding_window", None)
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    types = set(getattr(cfg, "layer_types", None) or ["sliding_attention"])
    if not window or valid.shape[0] == 1 or "sliding_attention" not in types or impl not in ("sdpa", "eager"):
        return valid.long()
    K = valid.shape[1]
    q_pos = positions[:, K - n_query:]  # [B, Q]
    causal = valid[:, None, :] & (positions[:, None, :] <= q_pos[:, :, None])  # [B, Q, K]
    # A hole's own query must attend to something (itself), or sdpa yields NaN that leaks through V.
    causal = causal | _self_diag(n_query, K, valid.device)
    sliding = causal & (q_pos[:, :, None] - positions[:, None, :] < window)

    def fmt(m: torch.Tensor) -> torch.Tensor:
        m = m[:, None]  # [B, 1, Q, K]
        if impl == "eager":
            dtype = model.dtype
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
        return m

    if len(types) > 1:
        return {"full_attention": fmt(causal), "sliding_attention": fmt(sliding)}
    return fmt(sliding)


def _self_diag(n_query: int, K: int, device: Any) -> torch.Tensor:
    """[1, Q, K] True where query i sits on slot K - Q + i."""
    return (torch.arange(K, device=device)[None, :] == (K - n_query + torch.arange(n_query, device=device))[:, None])[None]


class Cache(Component):
    """Owns the model call and the KV cache.

    The base implementation runs a transformers model over the slots it has not seen yet plus this
    step's inputs. Subclasses keep ``self._seen`` (slots already in the KV cache) and the cache
    object; ``cache_update`` crops it to ``state.n_slots``.
    """

    kind: ClassVar[Kind] = "cache"

    def setup(self, state: DecodeState) -> None:
        self._seen = 0

    def past_key_values(self) -> Any:
        return None

    def forward(self, state: DecodeState, inputs: torch.Tensor) -> torch.Tensor:
        """Run the model; ``inputs`` ``[B, T]`` are ``last`` plus the proposals. Returns the
        logits of those T positions, ``[B, T, V]``."""
        seen, T = self._seen, inputs.shape[1]
        B = inputs.shape[0]
        new_pos = (state.committed - 1)[:, None] + torch.arange(T, device=state.device)
        input_ids = torch.cat([state.tokens[:, seen:], inputs], 1)
        position_ids = torch.cat([state.slot_positions()[:, seen:], new_pos], 1)
        mask = torch.cat([state.valid, torch.ones(B, T, dtype=torch.bool, device=state.device)], 1)
        pkv = self.past_key_values()
        with eager_attention(state.device):
            out = state.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=slot_attention_mask(state.model, mask, torch.cat([state.slot_positions(), new_pos], 1), input_ids.shape[1]),
                **{cache_kwarg(state.model): pkv},
                use_cache=pkv is not None,
                logits_to_keep=T,
            )
        if pkv is not None:
            self._seen = state.n_slots + T
        return out.logits[:, -T:]

    def step(self, state: DecodeState, inputs: torch.Tensor, process: Callable[[DecodeState], None], sampler: "Sampler") -> tuple[torch.Tensor, torch.Tensor | None]:
        """One whole decode step: forward, the processors (``process(state)``) and selection.

        Returns the sampler's ``(tokens [B, T], probs [B, T, V] | None)``. The default runs the three
        eagerly; a cache that owns static buffers may override it to run them as one captured CUDA
        graph / ``torch.compile`` step (gpt-fast compiles exactly this unit).
        """
        logits = self.forward(state, inputs)
        if logits.dtype != torch.float32 or logits.device != state.device:  # a sharded model: last device
            logits = logits.to(state.device, torch.float32)
        state.scores = logits  # [B, T, V]
        process(state)
        return sampler.sample(state)

    def keeps_holes(self) -> bool:
        """``True``: after a step with proposals (or a rollback) the host loop leaves rejected slots
        in place as holes instead of trimming the trailing ones, which needs the device's answer
        (a host sync) before the next step can be queued. Only a cache that masks holes anyway and
        attends over fixed shapes wants that (a compiled static cache: the GPU then never waits
        for the host); it compacts its slots when they run out."""
        return False

    def cache_update(self, state: DecodeState) -> None:
        """Keep exactly ``state.n_slots`` slots."""

    def allocated_bytes(self) -> int:
        """Bytes this cache holds now (0 for no cache)."""
        return 0


class NoCache(Cache):
    """No KV cache: every step recomputes the whole sequence. Correct and slow; the baseline that
    shows what a KV cache buys."""


class Greedy(Sampler):
    """Argmax at every position."""

    def sample(self, state: DecodeState) -> tuple[torch.Tensor, None]:
        return state.scores.argmax(-1), None


class HFProcessor(Processor):
    """Wraps a transformers ``LogitsProcessor`` (any callable ``(input_ids, scores) -> scores``).

    It is called once per verified position with that position's prefix (committed tokens plus
    the proposals before it, left-padded like transformers' own ``input_ids``). Not serialisable
    to JSON: build it in Python.
    """

    processor: Any

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        scores = state.scores
        committed = state.committed_ids()
        out = []
        for t in range(scores.shape[1]):
            ids = torch.cat([committed, state.proposals[:, :t]], 1)
            out.append(self.processor(ids, scores[:, t].clone()))
        return torch.stack(out, 1)

    def to_dict(self) -> dict[str, Any]:
        from decodekit.errors import DecodekitError

        raise DecodekitError(
            f"HFProcessor({type(self.processor).__name__}) wraps a Python object and cannot be saved "
            "as JSON; use the equivalent decodekit component (e.g. from decodekit-samplers) instead."
        )


CORE_COMPONENTS: tuple[type[Component], ...] = (NoCache, Greedy, HFProcessor)
