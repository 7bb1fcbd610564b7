"""decodekit-serve: ``decodekit serve``, an OpenAI-compatible streaming server (SSE) with continuous
batching, where every request picks its own decoding strategy."""

from __future__ import annotations

import argparse
import sys

import decodekit

__all__ = ["create_app", "running", "Scheduler"]


def __getattr__(name: str):  # FastAPI is imported only when the server is used, not on plugin load
    if name in ("create_app", "running"):
        from decodekit_serve import app

        return getattr(app, name)
    if name == "Scheduler":
        from decodekit_serve.scheduler import Scheduler

        return Scheduler
    raise AttributeError(name)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from decodekit.errors import DecodekitError
    from decodekit_serve.app import bind, create_app

    if args.max_batch < 1:
        raise DecodekitError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"decodekit serve: warning: binding {args.host}: the server has no authentication", file=sys.stderr)
    model, tok = decodekit.load_model(args.model, dtype=args.dtype, device=args.device)
    model_id = args.model_id or (args.model or "SmolLM2-135M-Instruct")
    if args.max_len is not None and args.max_len < 2:
        raise DecodekitError(f"--max-len must be >= 2, got {args.max_len}")
    app = create_app(model, tok, model_id=model_id, max_batch=args.max_batch, cache=args.cache, max_len=args.max_len,
                     max_depth=args.max_depth, compile=args.compile)
    sched = app.state.scheduler
    cache = sched.cache if sched.cache == "dynamic" else (
        f"static, {sched.max_len} slots per row, {sched.batch.cache.allocated_bytes() / 2**20:.0f} MiB KV, "
        + ("compiled step (compiles before serving)" if sched.step_stats.get("compiled") else "eager step"))
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"decodekit serve: {model_id!r} on http://{host}:{port}/v1 (max batch {args.max_batch}, {cache} cache)", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0


@decodekit.hookimpl
def decodekit_register_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (SSE streaming, continuous batching)")
    p.add_argument("--model", default=None, help="local HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model-id", default=None, help="the name clients send as 'model' (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together; 1 serialises requests")
    p.add_argument("--cache", choices=("auto", "dynamic", "static"), default="auto",
                   help="KV cache of the batch: 'static' preallocates max_batch x max-len slots (fixed batch slots, "
                   "no per-step concatenation); 'auto' (default): static on CUDA, dynamic on CPU")
    p.add_argument("--max-len", type=int, default=None,
                   help="static cache: slots per row; prompt + max_tokens must fit (default: the context, at most 2048)")
    p.add_argument("--max-depth", type=int, default=16,
                   help="static cache, sliding-window models: proposals + rollback a step may write ahead (default 16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="static cache: run the decode forward as a compiled step with CUDA graphs (default: on CUDA)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, auto")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)
