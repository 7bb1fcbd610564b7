"""Load test for ``decodekit serve``: requests/s, tokens/s and time to first token (p50, p90) at 1,
4 and 16 concurrent streaming clients, against a continuously batching server and one that
serialises requests (``max_batch=1``), with the ratio; with the dynamic and/or the static KV cache.
Prints markdown tables.

    python benchmarks/serve_load.py                                  # embedded model, CPU, both caches
    python benchmarks/serve_load.py --device cuda --dtype bfloat16   # GPU, both caches
    python benchmarks/serve_load.py --cache static --device cuda --dtype bfloat16
    python benchmarks/serve_load.py --tiny --clients 1,4 --requests 2 --max-tokens 8   # quick check
    python benchmarks/serve_load.py --tiny --cache static --compile on --compile-backend aot_eager --clients 1,4 \
        --requests 1 --max-tokens 8                                  # the compiled static step, traced on CPU

With the static cache on CUDA the decode forward runs as a compiled step (``--compile auto``): each
server compiles it when it starts (once per batch size per process, ~20-40 s for max_batch 16 and
again for the serialised server's batch of 1; later servers only capture CUDA graphs). That happens
before the untimed warm-up request returns, so the timed load never includes it; the "warm-up (s)"
column is that first request's wall time.

Every client sends ``--requests`` streaming chat requests one after another (greedy,
``max_tokens`` tokens, EOS ignored so every request costs the same); the server runs in this
process (uvicorn in a thread) on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx
import torch

import decodekit
from decodekit_serve import create_app, running

QUESTIONS = ["Tell me about rivers.", "Write a short poem about the sea.", "Explain what a CPU does.",
             "Give me three tips for cooking rice.", "Why is the sky blue?", "Describe a cat.",
             "What is a prime number?", "Summarise the story of Hamlet."]


async def client(url: str, model_id: str, i: int, n: int, max_tokens: int, out: list[dict]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for j in range(n):
            body = {"model": model_id, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTIONS[(i + j) % len(QUESTIONS)]}],
                    "stream_options": {"include_usage": True}, "decodekit": {"stop_at_eos": False}}
            t0 = time.perf_counter()
            first, tokens = None, 0
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            out.append({"ttft": first if first is not None else float("nan"), "latency": time.perf_counter() - t0, "tokens": tokens})


def load(url: str, model_id: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    out: list[dict] = []

    async def main():
        await asyncio.gather(*(client(url, model_id, i, requests, max_tokens, out) for i in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in out)
    return {"req_s": len(out) / wall, "tok_s": sum(r["tokens"] for r in out) / wall,
            "ttft_p50": statistics.median(ttft), "ttft_p90": quantile(ttft, 0.9), "wall": wall, "n": len(out)}


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), on sorted ``xs``."""
    if len(xs) == 1:
        return xs[0]
    i = q * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (a smoke check of the script)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--cache", default="dynamic,static", help="dynamic, static, or both comma-separated (default both)")
    ap.add_argument("--max-len", type=int, default=1024, help="static cache slots per row (default 1024)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="static cache: compiled decode step (auto: on CUDA)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the static step (aot_eager: a CPU check)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    caches = [c.strip() for c in args.cache.split(",")]
    bad = [c for c in caches if c not in ("dynamic", "static")]
    if bad:
        ap.error(f"--cache: {bad[0]!r} is not 'dynamic' or 'static'")
    if args.tiny:
        from decodekit.testing import tiny_model, tiny_tokenizer

        model, tok = tiny_model(), tiny_tokenizer()
        if args.device:
            model = model.to(args.device)
    else:
        model, tok = decodekit.load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    print(f"model: {'tiny random llama' if args.tiny else args.model or 'SmolLM2-135M-Instruct'}, device {device}, "
          f"dtype {next(model.parameters()).dtype}, {args.requests} streaming chat requests per client, "
          f"{args.max_tokens} tokens each (greedy, EOS ignored), threads {torch.get_num_threads()}\n")
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    rows, steps = [], []
    for clients in [int(c) for c in args.clients.split(",")]:
        for cache in caches:
            res = {}
            for name, max_batch in (("batched", args.max_batch), ("serial", 1)):
                app = create_app(model, tok, model_id="m", max_batch=max_batch, cache=cache, max_len=args.max_len,
                                 compile=compile, compile_backend=args.compile_backend)
                sched = app.state.scheduler
                with running(app) as url:
                    t0 = time.perf_counter()
                    load(url, "m", 1, 1, 4)  # warm-up (compiling the static step, first forward, allocator)
                    warm = time.perf_counter() - t0
                    before = sched.step_stats
                    res[name] = load(url, "m", clients, args.requests, args.max_tokens)
                    after = sched.step_stats
                if cache == "static":
                    steps.append((clients, name, warm, after, {k: after[k] - before.get(k, 0) for k in ("compiled_steps", "eager_steps")}))
                del app, sched
                print(f"  done: {clients} clients, {cache} cache, {name}: {res[name]['tok_s']:.1f} tok/s "
                      f"(warm-up {warm:.1f} s)", file=sys.stderr, flush=True)
            rows.append((clients, cache, res))
    print("| clients | cache | server | requests/s | tokens/s | TTFT p50 (s) | TTFT p90 (s) | wall (s) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for clients, cache, res in rows:
        for name in ("batched", "serial"):
            r = res[name]
            label = f"continuous batch (max {args.max_batch})" if name == "batched" else "serialised (max 1)"
            print(f"| {clients} | {cache} | {label} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | {r['wall']:.1f} |")
    print("\n| clients | cache | tokens/s batched / serialised | TTFT p50 serialised / batched |")
    print("|---:|---|---:|---:|")
    for clients, cache, res in rows:
        b, s = res["batched"], res["serial"]
        print(f"| {clients} | {cache} | {b['tok_s'] / s['tok_s']:.2f}x | {s['ttft_p50'] / b['ttft_p50']:.2f}x |")
    if steps:
        print("\n| clients | static server | decode step | warm-up (s) | compile/capture (s) | compiled steps (timed) | eager steps (timed) |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for clients, name, warm, st, timed in steps:
            how = "compiled" if st.get("compiled") else ("eager (compile failed: " + st["compile_fallback"][:60] + ")"
                                                         if "compile_fallback" in st else "eager")
            print(f"| {clients} | {name} | {how} | {warm:.1f} | {st.get('warmup_s', 0.0):.1f} | {timed['compiled_steps']} | {timed['eager_steps']} |")
    if len(caches) > 1:
        print("\n| clients | tokens/s static / dynamic (batched) | TTFT p50 dynamic / static (batched) |")
        print("|---:|---:|---:|")
        by = {(c, k): r for c, k, r in rows}
        for clients in dict.fromkeys(c for c, _, _ in rows):
            st, dy = by[(clients, "static")]["batched"], by[(clients, "dynamic")]["batched"]
            print(f"| {clients} | {st['tok_s'] / dy['tok_s']:.2f}x | {dy['ttft_p50'] / st['ttft_p50']:.2f}x |")


if __name__ == "__main__":
    main()
