"""Strategy: the user's composition of cache, ordered processors, sampler, drafter and stopping.

The order of ``processors`` is the user's and is kept exactly (penalties -> constraints ->
temperature -> top-k/p -> sample is usual; transformers fixes an implicit order, decodekit does not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from decodekit.components import Cache, Component, Drafter, HFProcessor, Processor, Sampler
from decodekit.errors import DecodekitError


def _build(value: Any, base: type[Component], field: str) -> Component:
    if isinstance(value, base):
        return value
    if isinstance(value, Component):
        raise DecodekitError(f"Strategy.{field}: {type(value).__name__} is a {value.kind}, not a {base.kind}")
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict):
        from decodekit.plugins import get_plugin_manager

        if "name" not in value:
            raise DecodekitError(f"Strategy.{field}: a component dict needs a 'name' key, got {value!r}")
        config = dict(value)
        cls = get_plugin_manager().component(config.pop("name"))
        if not issubclass(cls, base):
            raise DecodekitError(f"Strategy.{field}: component {cls.component_name()!r} is a {cls.kind}, not a {base.kind}")
        return cls(**config)
    if base is Processor and callable(value):
        # Any transformers LogitsProcessor (or callable (input_ids, scores) -> scores) plugs in.
        return HFProcessor(processor=value)
    raise DecodekitError(f"Strategy.{field}: cannot use {value!r} as a {base.kind}")


class Strategy(BaseModel):
    """How to decode. Every component is a name (JSON), a dict with ``name`` + config, or an
    instance; ``None`` picks the installed default (the KV-cache plugin's cache if installed,
    else no cache; greedy; no drafter)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    cache: Any = None
    processors: list[Any] = Field(default_factory=list)
    sampler: Any = None
    drafter: Any = None
    stop: list[str] = Field(default_factory=list, description="stop strings (not part of the returned text)")
    stop_at_eos: bool = Field(True, description="finish a row at the tokenizer's EOS token(s)")
    max_new_tokens: int | None = Field(None, ge=1, description="used when generate is given none (the call's value wins)")
    eos_token_ids: list[int] | None = Field(None, description="ids that finish a row; None: the model's / tokenizer's EOS")

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v: Any) -> Any:
        return None if v is None else _build(v, Cache, "cache")

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler(cls, v: Any) -> Any:
        return None if v is None else _build(v, Sampler, "sampler")

    @field_validator("drafter", mode="before")
    @classmethod
    def _drafter(cls, v: Any) -> Any:
        return None if v is None else _build(v, Drafter, "drafter")

    @field_validator("processors", mode="before")
    @classmethod
    def _processors(cls, v: Any) -> Any:
        if v is None:
            return []
        return [_build(p, Processor, f"processors[{i}]") for i, p in enumerate(v)]

    # ----------------------------------------------------------- resolution
    def resolved(self) -> tuple[Cache, list[Processor], Sampler, Drafter | None]:
        from decodekit.components import Greedy, NoCache
        from decodekit.plugins import get_plugin_manager

        defaults = get_plugin_manager().defaults
        cache = self.cache or defaults.get("cache", NoCache)()
        sampler = self.sampler or defaults.get("sampler", Greedy)()
        return cache, list(self.processors), sampler, self.drafter

    # ----------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        def dump(c: Component | None) -> Any:
            return None if c is None else c.to_dict()

        return {
            "cache": dump(self.cache),
            "processors": [p.to_dict() for p in self.processors],
            "sampler": dump(self.sampler),
            "drafter": dump(self.drafter),
            "stop": list(self.stop),
            "stop_at_eos": self.stop_at_eos,
            # Only when set, so strategies saved before these fields existed read back unchanged.
            **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}),
            **({"eos_token_ids": list(self.eos_token_ids)} if self.eos_token_ids is not None else {}),
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Strategy":
        if not isinstance(data, dict):
            raise DecodekitError(f"a strategy must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(cls.model_fields)
        if unknown:
            raise DecodekitError(f"unknown strategy field(s) {sorted(unknown)}; allowed: {sorted(cls.model_fields)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Strategy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DecodekitError(f"strategy is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_generation_config(cls, cfg: Any) -> "Strategy":
        """Map a transformers ``GenerationConfig`` (see :func:`decodekit.hf.strategy_from_generation_config`);
        a field that cannot be honoured is an error naming it."""
        from decodekit.hf import strategy_from_generation_config

        return strategy_from_generation_config(cfg)

    def to_generation_config(self) -> Any:
        """The equivalent transformers ``GenerationConfig`` (see :func:`decodekit.hf.to_generation_config`)."""
        from decodekit.hf import to_generation_config

        return to_generation_config(self)

    @classmethod
    def from_file(cls, path: str | Path) -> "Strategy":
        return cls.from_json(Path(path).read_text())
