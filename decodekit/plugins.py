"""Plugin manager: entry points of group ``decodekit``, allow/deny switches, component registry.

Environment:
    DECODEKIT_DISABLE_PLUGIN_AUTOLOAD=1   load no entry-point plugin (the core still works)
    DECODEKIT_PLUGINS=a,b                 load only these entry points (by entry-point name)
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from decodekit import hookspecs
from decodekit.errors import DecodekitError, PluginError

GROUP = "decodekit"

#: Components of the first-party plugins, to tell users what to install.
KNOWN_COMPONENTS: dict[str, str] = {
    **dict.fromkeys(["DynamicCache", "StaticCache", "SlidingWindowCache"], "decodekit-kvcache"),
    **dict.fromkeys(
        [
            "Temperature", "TopK", "TopP", "MinP", "Typical", "EpsilonCutoff", "EtaCutoff",
            "RepetitionPenalty", "PresencePenalty", "FrequencyPenalty", "NoRepeatNGram", "LogitBias",
            "TopNSigma", "XTC", "DRY", "Mirostat", "Multinomial",
        ],
        "decodekit-samplers",
    ),
    "BannedWords": "decodekit-fsm",
    **dict.fromkeys(["DraftModel", "PromptLookup", "SelfSpeculative"], "decodekit-speculative"),
}


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    components: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class PluginManager:
    """A typed facade over ``pluggy.PluginManager`` (as tox 4 does): every call site is typed."""

    def __init__(self, *, autoload: bool | None = None) -> None:
        from decodekit import default_plugin

        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self.components: dict[str, type] = {}
        self.component_plugin: dict[str, str] = {}
        self.defaults: dict[str, type] = {}
        self.register(default_plugin, name="decodekit.core", distribution=("decodekit", _version("decodekit")))
        if autoload is None:
            autoload = os.environ.get("DECODEKIT_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes")
        if autoload:
            self.load_entrypoints()
        self.collect_components()

    # ------------------------------------------------------------------ loading
    def load_entrypoints(self) -> None:
        allow = os.environ.get("DECODEKIT_PLUGINS")
        allowed = {a.strip() for a in allow.split(",") if a.strip()} if allow is not None else None
        for ep in md.entry_points(group=GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            dist = (ep.dist.name, ep.dist.version) if ep.dist else (None, None)
            try:
                module = ep.load()
            except Exception as e:  # a broken plugin must not take the host down
                warnings.warn(
                    f"decodekit: plugin {ep.name!r} (distribution {dist[0]}) failed to import and was "
                    f"skipped: {type(e).__name__}: {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            self.register(module, name=ep.name, distribution=dist)

    def register(self, plugin: ModuleType | object, *, name: str, distribution: tuple[str | None, str | None] = (None, None)) -> None:
        """Register a plugin object; a hook with a wrong signature or an unknown hook name fails
        here, naming the plugin and the hook."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(
                f"decodekit plugin {name!r} (distribution {distribution[0]}) breaks the hook contract: {e}. "
                "Fix the hook's name or arguments to match decodekit.hookspecs."
            ) from e
        self._dists[name] = distribution

    def collect_components(self) -> None:
        for impl in reversed(self.pm.hook.decodekit_register_components.get_hookimpls()):
            def register(cls: type, *, default: bool = False, _plugin: str = impl.plugin_name) -> None:
                self._add_component(cls, _plugin, default)

            call_hook(impl, "decodekit_register_components", register=register)

    def _add_component(self, cls: type, plugin: str, default: bool) -> None:
        from decodekit.components import Component

        if not (isinstance(cls, type) and issubclass(cls, Component)):
            raise PluginError(f"decodekit plugin {plugin!r} registered {cls!r}, which is not a decodekit.Component subclass")
        name = cls.component_name()
        other = self.component_plugin.get(name)
        if other is not None and self.components[name] is not cls:
            raise PluginError(f"component name {name!r} is registered by both {other!r} and {plugin!r}; rename one")
        self.components[name] = cls
        self.component_plugin[name] = plugin
        if default:
            self.defaults[cls.kind] = cls

    # ------------------------------------------------------------------ queries
    def component(self, name: str) -> type:
        try:
            return self.components[name]
        except KeyError:
            dist = KNOWN_COMPONENTS.get(name)
            if dist:
                hint = f"it is provided by the distribution {dist!r}: pip install ./plugins/{dist} (or pip install {dist})"
                if os.environ.get("DECODEKIT_DISABLE_PLUGIN_AUTOLOAD") or os.environ.get("DECODEKIT_PLUGINS") is not None:
                    hint += "; plugin loading is restricted by DECODEKIT_DISABLE_PLUGIN_AUTOLOAD / DECODEKIT_PLUGINS"
            else:
                hint = "known components: " + ", ".join(sorted(self.components))
            raise DecodekitError(f"unknown decodekit component {name!r}; {hint}") from None

    def per_token(self, hook: str) -> tuple[tuple[str, Callable], ...]:
        """Plain functions implementing a per-token hook, resolved once (LIFO like pluggy)."""
        caller = getattr(self.pm.hook, f"decodekit_{hook}")
        return tuple((f"plugin {i.plugin_name!r} hook decodekit_{hook}", i.function) for i in reversed(caller.get_hookimpls()))

    def call(self, hook: str, **kwargs: Any) -> None:
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            call_hook(impl, hook, **kwargs)

    def plugins(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            dist, version = self._dists.get(name, (None, None))
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            comps = sorted(c for c, p in self.component_plugin.items() if p == name)
            out.append(PluginInfo(name, dist, version, hooks, comps))
        return out


def call_hook(impl: Any, hook: str, **kwargs: Any) -> Any:
    try:
        return impl.function(**{k: kwargs[k] for k in impl.argnames})
    except Exception as e:
        e.add_note(f"decodekit: raised in plugin {impl.plugin_name!r}, hook {hook}")
        raise


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_PM: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (loaded on first use)."""
    global _PM
    if _PM is None:
        _PM = PluginManager()
    return _PM


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin at run time)."""
    global _PM
    _PM = None


def iter_components(names: Iterable[str]) -> list[type]:
    pm = get_plugin_manager()
    return [pm.component(n) for n in names]
