"""Classic speculative decoding with a smaller draft model (Leviathan et al. 2023; Chen et al. 2023)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from decodekit.components import Drafter
from decodekit.errors import DecodekitError
from decodekit.state import DecodeState, Proposal
from decodekit_speculative.drafting import AdaptiveExit, DraftNet, add_stats, check_vocab, draft, draft_fixed


class AdaptiveFields(Drafter):
    """Fields of Draft & Verify's adaptive draft exit (arXiv 2309.08168, defaults from the paper)."""

    adaptive: bool = False
    threshold: float = Field(0.6, description="initial top-1 probability below which drafting stops")
    beta1: float = 0.5
    alpha: float = Field(0.9, description="target acceptance rate")
    epsilon: float = 0.01
    beta2: float = 0.9
    compile: bool | None = Field(
        None,
        description="draft through a preallocated KV store with compiled fixed-shape passes (decodekit-kvcache's "
        "KVStore); None: when the target runs decodekit-kvcache's compiled StaticCache step (on CUDA by default)",
    )
    compile_backend: str | None = Field(
        None, description="torch.compile backend of the draft passes; None: the StaticCache's ('eager' traces without codegen)"
    )

    @field_validator("k", check_fields=False)
    @classmethod
    def _k(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"k (tokens drafted per step) must be >= 1, got {v}; use no drafter for plain decoding")
        return v

    @field_validator("threshold", "beta1", "alpha", "beta2")
    @classmethod
    def _unit(cls, v: float, info) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{info.field_name} must be in [0, 1], got {v}")
        return v

    def _setup_exit(self, state: DecodeState) -> None:
        self._exit = (
            AdaptiveExit(state.batch_size, state.device, self.threshold, self.beta1, self.alpha, self.epsilon, self.beta2)
            if self.adaptive else None
        )
        self._updated = -1

    def _make_net(self, state: DecodeState, model: Any, tag: str, **eager: Any) -> Any:
        """The draft network: static and compiled (see :mod:`decodekit_speculative.static_draft`)
        when ``compile`` says so or the target runs a compiled StaticCache, else eager with a
        transformers cache."""
        from decodekit_speculative.static_draft import StaticDraftNet, target_compiles

        on, backend = target_compiles(state)
        on = on if self.compile is None else self.compile
        old = self.__dict__.get("_net")
        if isinstance(old, StaticDraftNet):  # the previous generation is over: reuse its buffers
            old.release()
        if not on:
            return DraftNet(model, **eager)
        return StaticDraftNet(model, state, self.k, backend=self.compile_backend or backend, compiled=True, tag=tag)

    def teardown(self, state: DecodeState) -> None:
        from decodekit_speculative.static_draft import StaticDraftNet

        net = self.__dict__.get("_net")
        if isinstance(net, StaticDraftNet):  # its pooled buffers serve the next generation now
            net.release()

    def _propose(self, state: DecodeState, **kwargs: Any) -> Proposal | None:
        net = self._net
        if isinstance(net, DraftNet):
            proposal = draft(net, state, self.k, exit=self._exit, **kwargs)
        else:
            proposal = draft_fixed(net, state, self.k, exit=self._exit, **kwargs)
        self._report(state, net)
        return proposal

    def _report(self, state: DecodeState, net: Any) -> None:
        # Python ints: no host sync (the threshold mean syncs, so only with the adaptive exit, which syncs anyway).
        add_stats(state, draft_forward_passes=net.passes, target_forward_passes=state.forward_passes + 1)
        if not isinstance(net, DraftNet):
            add_stats(state, draft_compiled_passes=net.compiled_passes, draft_prefills=net.prefills, draft_warmup_s=net.warmup_s)
        if self._exit is not None:
            add_stats(state, draft_threshold=float(self._exit.th.mean()))

    def _update_exit(self, state: DecodeState) -> None:
        # accept runs twice after a rollback request; learn from each verify step once.
        if self._exit is None or self._updated == state.step or state.n_proposed is None:
            return
        self._updated = state.step
        self._exit.update(state.n_proposed, state.n_matched, self.k)


class DraftModel(AdaptiveFields):
    """A smaller model with the target's vocabulary drafts ``k`` tokens per step.

    Fields:
        model: the draft model (a transformers causal LM), or a path ``decodekit.load_model`` takes.
        k: tokens drafted per step.
        sample: draw drafts from the draft's softmax (at ``temperature``) and verify with
            min(1, p/q); by default drafts are greedy (q one-hot), which is exact for any sampler.
        temperature: the draft's sampling temperature (with ``sample``).
        adaptive, threshold, beta1, alpha, epsilon, beta2: Draft & Verify's adaptive draft exit.
        compile, compile_backend: draft through a static KV store with compiled fixed-shape passes
            (:mod:`decodekit_speculative.static_draft`); default: when the target runs a compiled
            StaticCache.
    """

    model: Any
    k: int = 4
    sample: bool = False
    temperature: float = 1.0

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"temperature must be > 0, got {v}; for greedy drafts set sample=False")
        return v

    def _model(self) -> Any:
        if isinstance(self.model, str):
            from decodekit.models import load_model

            if getattr(self, "_loaded", None) is None or self._loaded[0] != self.model:
                self._loaded = (self.model, load_model(self.model)[0])
            return self._loaded[1]
        if not callable(self.model) or not hasattr(self.model, "get_input_embeddings"):
            raise DecodekitError(f"DraftModel.model must be a transformers causal LM or a model path, got {type(self.model).__name__}")
        return self.model

    def setup(self, state: DecodeState) -> None:
        model = self._model()
        check_vocab(model, state, "DraftModel")
        from decodekit_speculative.static_draft import network_tag

        self._net = self._make_net(state, model, network_tag(model))
        self._setup_exit(state)

    def pre_logits(self, state: DecodeState) -> Proposal | None:
        return self._propose(state, sample=self.sample, temperature=self.temperature)

    def accept(self, state: DecodeState) -> None:
        self._update_exit(state)

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.model, str):
            raise DecodekitError("DraftModel(model=<object>) cannot be saved as JSON; give the model as a path (model='/path/to/dir')")
        return super().to_dict()
