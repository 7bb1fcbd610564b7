"""The OpenAI request/response shapes and their mapping onto a decodekit :class:`~decodekit.Strategy`.

Request bodies are pydantic models with ``extra="forbid"``: an unknown field is a 400 naming it,
not a silently ignored option (OpenAI's own API rejects unknown parameters too).
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from decodekit.components import Component, Greedy
from decodekit.errors import DecodekitError
from decodekit.plugins import get_plugin_manager
from decodekit.strategy import Strategy


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Ranges are OpenAI's documented ones."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    #: decodekit's extension: a JSON strategy (processors, sampler, drafter, stop, stop_at_eos).
    decodekit: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: Any) -> Any:
        for k, b in (v or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias[{k}] = {b} is outside [-100, 100]")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


def check_unsupported(req: _Sampling) -> None:
    """Fields OpenAI defines that this server does not implement: refuse, never ignore."""
    if req.n not in (None, 1):
        raise APIError(f"n={req.n}: this server returns one choice per request; send {req.n} requests instead", param="n")
    if getattr(req, "logprobs", None) or getattr(req, "top_logprobs", None):
        raise APIError("logprobs are not supported by decodekit serve; leave logprobs unset", param="logprobs")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError("echo=true is not supported; leave it unset", param="echo")
        if req.suffix is not None:
            raise APIError("suffix (insertion) is not supported; leave it unset", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(f"best_of={req.best_of} is not supported; leave it unset", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed with stream=true", param="stream_options")


# ------------------------------------------------------------------------------------ strategy
def _component(name: str, param: str, *args: Any) -> Component:
    """Build a registered component for an OpenAI field, naming the field when it is missing."""
    try:
        cls = get_plugin_manager().component(name)
        return cls(*args)
    except DecodekitError as e:
        raise APIError(f"{param} needs the decodekit component {name!r}, which is not installed: {e}", param=param,
                       code="component_not_installed") from None
    except ValidationError as e:
        raise APIError(f"{param}: {e.errors()[0]['msg']}", param=param) from None


def build_strategy(req: _Sampling, vocab_size: int) -> Strategy:
    """Map the OpenAI fields onto a strategy, around the user's own ``decodekit`` strategy:

    ``[logit_bias, presence, frequency] + decodekit.processors + [temperature, top_p]`` then the
    sampler. Penalties and biases act on raw logits before any constraint, temperature and nucleus
    come last before sampling: the order transformers and vLLM apply them in. A field left unset
    adds nothing (the strategy decides; greedy by default: see the docs).
    """
    spec = dict(req.decodekit or {})
    if spec.get("cache") is not None:
        raise APIError("decodekit.cache: all rows of the server's batch share its KV cache; remove the 'cache' key",
                       param="decodekit.cache")
    try:
        base = Strategy.from_dict(spec)
    except DecodekitError as e:
        raise APIError(f"decodekit: {e}", param="decodekit", code="invalid_strategy") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(f"decodekit.{loc}: {err['msg']}", param=f"decodekit.{loc}", code="invalid_strategy") from None

    before: list[Component] = []
    if req.logit_bias:
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        bad = [k for k in bias if not 0 <= k < vocab_size]
        if bad:
            raise APIError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="logit_bias")
        before.append(_component("LogitBias", "logit_bias", bias))
    if req.presence_penalty:
        before.append(_component("PresencePenalty", "presence_penalty", req.presence_penalty))
    if req.frequency_penalty:
        before.append(_component("FrequencyPenalty", "frequency_penalty", req.frequency_penalty))

    after: list[Component] = []
    sampler = base.sampler
    if req.temperature is not None and req.temperature == 0:
        sampler = sampler or Greedy()  # OpenAI's temperature 0 means (near-)deterministic
    elif req.temperature is not None:
        after.append(_component("Temperature", "temperature", req.temperature))
        sampler = sampler or _component("Multinomial", "temperature")
    if req.top_p is not None and req.top_p < 1 and req.temperature != 0:
        after.append(_component("TopP", "top_p", req.top_p))
        sampler = sampler or _component("Multinomial", "top_p")
    return Strategy(processors=[*before, *base.processors, *after], sampler=sampler, drafter=base.drafter,
                    stop=list(base.stop), stop_at_eos=base.stop_at_eos)


def new_seed(req: _Sampling) -> int:
    return req.seed if req.seed is not None else secrets.randbits(62)


# ------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_body(rid: str, model: str, created: int, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def chat_body(rid: str, model: str, created: int, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}], "usage": use}


def now() -> int:
    return int(time.time())
