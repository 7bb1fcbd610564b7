"""Self-speculative decoding by sublayer skipping: Draft & Verify (Zhang et al. 2023, arXiv 2309.08168).

The target drafts for itself with some attention and MLP sublayers bypassed. Nothing is copied:
the draft is a *view* of the target (:func:`skipped_view`), a second module tree made of shallow
module copies that share every parameter, in which the skipped sublayers are replaced by modules
returning zeros. A pre-norm residual block ``h + f(norm(h))`` with ``f`` returning zeros is exactly
``h``: the sublayer is skipped (Gemma 3's post-sublayer norm maps zeros to zeros). The target's
forward, its parameters and its ``state_dict`` never change, nothing is patched while it runs, and
torch.compile traces the view like any module: one compiled draft graph per skip set.
(:func:`skipping` patches instance forwards for the duration of a ``with`` block instead: kept as
a utility, and as the oracle the view is tested against.)

KV cache: the draft sub-network has its own cache (:class:`~decodekit_speculative.drafting.DraftKV`)
mirroring the target's slot buffer, so the target's cache is never written by a draft pass whatever
cache plugin the strategy uses (dynamic, static, none). Draft & Verify instead lets the draft read
the full model's prefix KV; that needs write access into the target cache's internals, which are
another plugin's private state, so decodekit pays a draft prefill (with the skips) instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import model_validator

from decodekit.errors import DecodekitError
from decodekit.state import DecodeState, Proposal
from decodekit_speculative.draft_model import AdaptiveFields
from decodekit_speculative.static_draft import network_tag


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


class _SkipAttention(torch.nn.Module):
    """Stands in for a skipped attention sublayer: outputs zeros (no keys are cached for it)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class _SkipMLP(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _shell(module: torch.nn.Module, children: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A shallow copy of ``module`` (same parameters, buffers, config) with some children replaced."""
    new = copy.copy(module)
    new._modules = {**module._modules, **children}  # copy.copy shares the dict: replace it, never edit it
    return new


def skipped_view(model: Any, attention: tuple[int, ...], mlp: tuple[int, ...]) -> Any:
    """The target with the given sublayers skipped, as its own module tree that shares every
    parameter (nothing is copied but a few module shells): a plain nn.Module that torch.compile
    traces as one graph per skip set, with no patching of the target while it runs. Cached per
    (model, skip set), so later generations reuse the compiled graphs."""
    per_model = _VIEWS.setdefault(model, {})
    key = (attention, mlp)
    view = per_model.get(key)
    if view is not None:
        return view
    layers = decoder_layers(model)
    new_layers = []
    for i, layer in enumerate(layers):
        children = {}
        if i in attention:
            children["self_attn"] = _SkipAttention()
        if i in mlp:
            children["mlp"] = _SkipMLP()
        new_layers.append(_shell(layer, children) if children else layer)
    new_list = torch.nn.ModuleList(new_layers)
    # rebuild the path from the model down to the layer list
    path = _path_to(model, layers)
    view = _rebuild(model, path, new_list)
    per_model[key] = view
    return view


_VIEWS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _path_to(root: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    for name, module in root.named_modules():
        if module is target:
            return name.split(".") if name else []
    raise DecodekitError(f"SelfSpeculative: the decoder layers are not a submodule of {type(root).__name__}")


def _rebuild(module: torch.nn.Module, path: list[str], leaf: torch.nn.Module) -> torch.nn.Module:
    if not path:
        return leaf
    head, rest = path[0], path[1:]
    return _shell(module, {head: _rebuild(module._modules[head], rest, leaf)})


class SelfSpeculative(AdaptiveFields):
    """The target drafts for itself with sublayers skipped (Draft & Verify).

    Fields:
        skip_attention: decoder layers whose attention sublayer the draft skips.
        skip_mlp: decoder layers whose MLP sublayer the draft skips.
        skip_file: a JSON file written by ``decodekit search-skip`` (fills the two lists).
        k: most tokens drafted per step.
        adaptive, threshold, beta1, alpha, epsilon, beta2: the adaptive draft exit (on by default).
        compile, compile_backend: draft through a static KV store with compiled passes (one graph
            per skip set; default: when the target runs a compiled StaticCache).
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
        view = skipped_view(state.model, attention, mlp)
        tag = network_tag(state.model, f"_a{'-'.join(map(str, attention))}_m{'-'.join(map(str, mlp))}")
        self._net = self._make_net(state, view, tag, skipped_attention=frozenset(attention), n_layers=n)
        self._setup_exit(state)

    def pre_logits(self, state: DecodeState) -> Proposal | None:
        return self._propose(state)

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
