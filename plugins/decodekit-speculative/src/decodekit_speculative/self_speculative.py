"""Self-speculative decoding by sublayer skipping: Draft & Verify (Zhang et al. 2023, arXiv 2309.08168).

The target drafts for itself with some attention and MLP sublayers bypassed. Nothing is copied: the
bypass replaces the chosen sublayers' ``forward`` on the *instance* only for the duration of a draft
pass (``del module.forward`` restores the class's), so the target's own forward, its parameters and
its ``state_dict`` never change. A pre-norm residual block ``h + f(norm(h))`` with ``f`` returning
zeros is exactly ``h``: the sublayer is skipped (Gemma 3's post-sublayer norm maps zeros to zeros).

KV cache: the draft sub-network has its own cache (:class:`~decodekit_speculative.drafting.DraftKV`)
mirroring the target's slot buffer, so the target's cache is never written by a draft pass whatever
cache plugin the strategy uses (dynamic, static, none). Draft & Verify instead lets the draft read
the full model's prefix KV; that needs write access into the target cache's internals, which are
another plugin's private state, so decodekit pays a draft prefill (with the skips) instead.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import model_validator

from decodekit.errors import DecodekitError
from decodekit.state import DecodeState, Proposal
from decodekit_speculative.draft_model import AdaptiveFields
from decodekit_speculative.drafting import DraftNet, draft


def decoder_layers(model: Any) -> Any:
    """The decoder blocks of a transformers causal LM (each with ``self_attn`` and ``mlp``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and len(layers) and hasattr(layers[0], "self_attn") and hasattr(layers[0], "mlp"):
        return layers
    for module in model.modules():  # other layouts: the first ModuleList of attention+MLP blocks
        if isinstance(module, torch.nn.ModuleList) and len(module) and hasattr(module[0], "self_attn") and hasattr(module[0], "mlp"):
            return module
    raise DecodekitError(
        f"SelfSpeculative: cannot find decoder layers with self_attn and mlp in {type(model).__name__}; "
        "use DraftModel or PromptLookup with this architecture"
    )


def _skip_attention(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    return torch.zeros_like(hidden_states), None


def _skip_mlp(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.zeros_like(hidden_states)


@contextlib.contextmanager
def skipping(model: Any, attention: tuple[int, ...] | list[int], mlp: tuple[int, ...] | list[int]) -> Iterator[None]:
    """Bypass the given sublayers of ``model`` inside the ``with`` block (weights shared)."""
    layers = decoder_layers(model)
    patched = []
    try:
        for i in attention:
            layers[i].self_attn.forward = _skip_attention
            patched.append(layers[i].self_attn)
        for i in mlp:
            layers[i].mlp.forward = _skip_mlp
            patched.append(layers[i].mlp)
        yield
    finally:
        for module in patched:
            del module.forward  # the class's forward is visible again


class _SkippingModel:
    """Calls the target with the skip set active; what :class:`DraftNet` drives."""

    def __init__(self, model: Any, attention: tuple[int, ...], mlp: tuple[int, ...]) -> None:
        self.model, self.attention, self.mlp = model, attention, mlp

    def get_input_embeddings(self) -> Any:
        return self.model.get_input_embeddings()

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __call__(self, **kwargs: Any) -> Any:
        with skipping(self.model, self.attention, self.mlp):
            return self.model(**kwargs)


class SelfSpeculative(AdaptiveFields):
    """The target drafts for itself with sublayers skipped (Draft & Verify).

    Fields:
        skip_attention: decoder layers whose attention sublayer the draft skips.
        skip_mlp: decoder layers whose MLP sublayer the draft skips.
        skip_file: a JSON file written by ``decodekit search-skip`` (fills the two lists).
        k: most tokens drafted per step.
        adaptive, threshold, beta1, alpha, epsilon, beta2: the adaptive draft exit (on by default).
    """

    skip_attention: list[int] = []
    skip_mlp: list[int] = []
    skip_file: str | None = None
    k: int = 6
    adaptive: bool = True

    @model_validator(mode="after")
    def _load(self) -> "SelfSpeculative":
        if self.skip_file is not None and not (self.skip_attention or self.skip_mlp):
            data = load_skip_file(self.skip_file)
            # object.__setattr__: validate_assignment would re-run this validator
            object.__setattr__(self, "skip_attention", sorted(int(i) for i in data["skip_attention"]))
            object.__setattr__(self, "skip_mlp", sorted(int(i) for i in data["skip_mlp"]))
        for name in ("skip_attention", "skip_mlp"):
            bad = [i for i in getattr(self, name) if i < 0]
            if bad:
                raise ValueError(f"{name} holds negative layer indices {bad}; layers count from 0")
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "SelfSpeculative":
        """The skip set found by ``decodekit search-skip`` (and its ``k``), with overrides."""
        data = load_skip_file(path)
        config = {"skip_attention": data["skip_attention"], "skip_mlp": data["skip_mlp"]}
        if "k" in data:
            config["k"] = data["k"]
        return cls(**{**config, **overrides})

    def setup(self, state: DecodeState) -> None:
        n = len(decoder_layers(state.model))
        for name in ("skip_attention", "skip_mlp"):
            bad = [i for i in getattr(self, name) if i >= n]
            if bad:
                raise DecodekitError(f"SelfSpeculative.{name} holds layer indices {bad}; the model has {n} layers (0..{n - 1})")
        attention, mlp = tuple(sorted(set(self.skip_attention))), tuple(sorted(set(self.skip_mlp)))
        self._net = DraftNet(_SkippingModel(state.model, attention, mlp), frozenset(attention), n)
        self._setup_exit(state)

    def pre_logits(self, state: DecodeState) -> Proposal | None:
        proposal = draft(self._net, state, self.k, exit=self._exit)
        self._report(state, self._net)
        return proposal

    def accept(self, state: DecodeState) -> None:
        self._update_exit(state)


def load_skip_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"skip_file {str(p)!r} does not exist; create it with: decodekit search-skip MODEL --out {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"skip_file {str(p)!r} is not valid JSON ({e}); re-run decodekit search-skip") from None
    missing = [key for key in ("skip_attention", "skip_mlp") if key not in data]
    if missing:
        raise ValueError(f"skip_file {str(p)!r} lacks {missing}; it must be written by decodekit search-skip")
    return data
