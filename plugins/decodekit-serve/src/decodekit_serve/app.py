"""The FastAPI application: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Streaming answers are Server-Sent Events (``data: {json}\\n\\n`` chunks, then ``data: [DONE]``)
sent through Starlette's ``StreamingResponse``: when the client disconnects, Starlette cancels the
generator, whose ``finally`` cancels the job, and the scheduler drops its row before the next step.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from decodekit.errors import DecodekitError
from decodekit.loop import context_length, tokenize_prompts
from decodekit_serve import protocol as P
from decodekit_serve.scheduler import Job, Scheduler

#: How often a non-streaming request checks whether its client is still there (seconds).
DISCONNECT_POLL_S = 0.25
#: Static cache slots per row when --max-len is not given (and the context is longer).
DEFAULT_STATIC_LEN = 2048


def resolve_cache(cache: str, model: Any) -> str:
    """``auto``: static on CUDA (no per-step concatenation, bounded memory reserved at start, a
    fixed-shape step), dynamic elsewhere (on a CPU the static store only costs memory)."""
    if cache not in ("auto", "dynamic", "static"):
        raise DecodekitError(f"cache must be 'auto', 'dynamic' or 'static', got {cache!r}")
    if cache == "auto":
        return "static" if model.get_input_embeddings().weight.device.type == "cuda" else "dynamic"
    return cache


def create_app(model: Any, tokenizer: Any, *, model_id: str = "decodekit", max_batch: int = 16, cache: str = "auto",
               max_len: int | None = None, max_depth: int = 16, compile: bool | None = None,
               compile_backend: str = "inductor") -> FastAPI:
    """An app serving ``model`` under the name ``model_id``; its scheduler thread starts and stops
    with the app's lifespan (``app.state.scheduler``).

    ``cache``: ``"dynamic"`` (a growing KV cache), ``"static"`` (rows in fixed batch slots of a
    preallocated ``[max_batch, H_kv, max_len, D]`` store per layer; ``max_len`` defaults to the
    model's context, at most 2048) or ``"auto"`` (static on CUDA, dynamic elsewhere).
    ``compile`` (static cache): run the decode forward as a compiled step (CUDA graphs); ``None``:
    on CUDA only. It is compiled when the app starts, before the first request."""
    ctx = context_length(model)
    cache = resolve_cache(cache, model)
    if cache == "static" and max_len is None:
        max_len = min(ctx or DEFAULT_STATIC_LEN, DEFAULT_STATIC_LEN)
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, cache=cache, max_len=max_len or DEFAULT_STATIC_LEN,
                          max_depth=max_depth, compile=compile, compile_backend=compile_backend)
    cfg = model.config
    vocab = int(getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "vocab_size", None) or len(tokenizer))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="decodekit serve", lifespan=lifespan)
    app.state.scheduler = scheduler

    # ------------------------------------------------------------------ errors, OpenAI-shaped
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            param = None
            msg = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        elif err.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}: remove it (decodekit options go in the 'decodekit' strategy object)"
        elif err.get("type") == "missing":
            msg = f"missing required field {param!r}"
        else:
            msg = f"{param}: {err['msg']} (got {err.get('input')!r})" if param else err["msg"]
        return JSONResponse(P.error_body(msg, param=param), status_code=400)

    @app.exception_handler(P.APIError)
    async def _api(request: Request, exc: P.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(DecodekitError)
    async def _dk(request: Request, exc: DecodekitError) -> JSONResponse:
        return JSONResponse(P.error_body(str(exc)), status_code=400)

    # ------------------------------------------------------------------ helpers
    def check_model(name: str) -> None:
        if name != model_id:
            raise P.APIError(f"model {name!r} does not exist; this server serves {model_id!r}", status=404,
                             param="model", code="model_not_found")

    def make_job(req: P._Sampling, ids: list[int], max_tokens: int | None, default_max: int) -> Job:
        P.check_unsupported(req)
        if ctx is not None and len(ids) >= ctx:
            raise P.APIError(f"the prompt has {len(ids)} tokens; the model's context is {ctx}: shorten it",
                             param="messages" if isinstance(req, P.ChatRequest) else "prompt", code="context_length_exceeded")
        room = ctx - len(ids) if ctx is not None else default_max
        max_new = max_tokens if max_tokens is not None else min(default_max, room)
        if max_new > room:
            raise P.APIError(f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's context of {ctx}: "
                             f"use max_tokens <= {room}", param="max_tokens", code="context_length_exceeded")
        strategy = P.build_strategy(req, vocab)
        if scheduler.cache == "static":
            # The static cache has max_len slots per row: a default max_tokens shrinks to fit it,
            # an explicit one that cannot fit is refused here, before any compute.
            k = scheduler.batch.proposal_slots(strategy)  # a compiled step pads proposals to its width
            if max_tokens is None:
                max_new = max(1, min(max_new, scheduler.max_len - len(ids) - k))
            try:
                scheduler.check_fit(len(ids), max_new, strategy)
            except DecodekitError as e:
                param = "max_tokens" if len(ids) + 1 + k <= scheduler.max_len else ("messages" if isinstance(req, P.ChatRequest) else "prompt")
                raise P.APIError(str(e), param=param, code="context_length_exceeded") from None
        return Job(prompt_ids=ids, strategy=strategy, max_new_tokens=max_new, seed=P.new_seed(req),
                   stops=req.stops() + list(strategy.stop))

    async def next_event(job: Job, request: Request | None) -> tuple:
        """The job's next event. A non-streaming request also checks, every DISCONNECT_POLL_S
        (events or not), whether its client is still there; once it left, the job is cancelled
        and ``("gone",)`` returned."""
        loop = asyncio.get_running_loop()
        while True:
            if request is not None and loop.time() - job.checked >= DISCONNECT_POLL_S:
                job.checked = loop.time()
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    return ("gone",)
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue

    def error_response(e: BaseException) -> JSONResponse:
        if isinstance(e, (DecodekitError, ValueError)):
            return JSONResponse(P.error_body(f"the strategy failed: {e}", param="decodekit"), status_code=400)
        return JSONResponse(P.error_body(f"generation failed: {type(e).__name__}: {e}", type="server_error"), status_code=500)

    async def respond(req: P._Sampling, job: Job, request: Request, chat: bool) -> Any:
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        job.checked = job.loop.time()
        rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
        scheduler.submit(job)
        try:
            first = await next_event(job, request)
        except BaseException:
            scheduler.cancel(job)
            raise
        if first[0] == "gone":
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        if first[0] == "error":
            return error_response(first[1])
        if not req.stream:
            text = []
            event = first
            try:
                while event[0] == "delta":
                    text.append(event[1])
                    event = await next_event(job, request)
            finally:
                if not job.done:
                    scheduler.cancel(job)
            if event[0] == "gone":
                return Response(status_code=499)
            if event[0] == "error":
                return error_response(event[1])
            use = P.usage(len(job.prompt_ids), event[2])
            body = (P.chat_body if chat else P.completion_body)(rid, model_id, created, "".join(text), event[1], use)
            return JSONResponse(body)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                body = P.chat_chunk(rid, model_id, created, d, finish)
            else:
                body = P.completion_chunk(rid, model_id, created, delta or "", finish)
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> AsyncIterator[str]:
            event = first
            try:
                if chat:
                    yield chunk(None, None, role=True)
                while event[0] == "delta":
                    yield chunk(event[1], None)
                    event = await next_event(job, None)
                if event[0] == "error":
                    # Headers are sent: report in-band in the error shape, then end the stream.
                    yield f"data: {json.dumps(P.error_body(f'generation failed: {event[1]}', type='server_error'))}\n\n"
                else:
                    yield chunk(None, event[1])
                    if include_usage:
                        use = P.usage(len(job.prompt_ids), event[2])
                        tail = (P.chat_chunk if chat else P.completion_chunk)(rid, model_id, created, {} if chat else "", None)
                        tail["choices"], tail["usage"] = [], use
                        yield f"data: {json.dumps(tail)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not job.done:  # the client went away (Starlette cancelled us): free the row
                    scheduler.cancel(job)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "decodekit"}]}

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise P.APIError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise P.APIError(f"prompt is a list of {len(prompt)} strings; send one prompt per request", param="prompt")
                prompt = prompt[0]
            try:
                ids = tokenize_prompts(tokenizer, [prompt], chat=False)[0][0]
            except DecodekitError as e:
                raise P.APIError(str(e).replace("prompt 0", "prompt"), param="prompt") from None
        job = make_job(req, ids, req.max_tokens, default_max=16)  # OpenAI's completions default
        return await respond(req, job, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatRequest, request: Request) -> Any:
        check_model(req.model)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise P.APIError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        msgs = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        try:
            ids = tokenize_prompts(tokenizer, [msgs], chat=True)[0][0]
        except DecodekitError as e:
            raise P.APIError(str(e).replace("prompt 0", "messages"), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = make_job(req, ids, max_tokens, default_max=ctx or 4096)  # OpenAI's chat default: up to the context
        return await respond(req, job, request, chat=True)

    return app


# ------------------------------------------------------------------------------------ running
def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; ``port=0`` picks a free one (no race between choosing and binding)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields the base URL. For tests and benchmarks."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        if time.monotonic() - start > timeout or not thread.is_alive():
            raise RuntimeError("the decodekit server did not start")
        time.sleep(0.02)
    try:
        h, p = sock.getsockname()[:2]
        yield f"http://{h}:{p}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
