"""The server's decode step and join, dynamic vs static KV cache, without HTTP: one continuous batch
(:class:`decodekit.batching.Batch` vs :class:`decodekit_serve.static.StaticBatch`) of ``--rows``
greedy rows, timed in alternating rounds so both caches see the same machine load. Prints a markdown
table of ms per step (median over rounds) and ms for one row to join the running batch (once).

    python benchmarks/serve_static_step.py --rows 4                               # embedded model, CPU
    python benchmarks/serve_static_step.py --rows 4,16 --device cuda --dtype bfloat16
    python benchmarks/serve_static_step.py --tiny --rows 4 --steps 8 --rounds 2   # quick check
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decodekit
from decodekit.batching import Batch, RowSpec, row_seed
from decodekit.loop import tokenize_prompts
from decodekit.strategy import Strategy
from decodekit_serve.static import StaticBatch

QUESTIONS = ["Tell me about rivers.", "Write a short poem about the sea.", "Explain what a CPU does.",
             "Give me three tips for cooking rice.", "Why is the sky blue?", "Describe a cat.",
             "What is a prime number?", "Summarise the story of Hamlet."]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(kind: str, model, tok, ids: list[list[int]], rows: int, budget: int, max_len: int, max_batch: int) -> tuple[Batch, float]:
    """A running batch of ``rows`` rows, and the ms it took the last one to join the others."""
    device = model.get_input_embeddings().weight.device
    b = StaticBatch(model, tok, max_batch=max_batch, max_len=max_len) if kind == "static" else Batch(model, tok)
    spec = lambda i: RowSpec(i, ids[i % len(ids)], Strategy.from_dict({"stop_at_eos": False}), budget, row_seed(0))  # noqa: E731
    with torch.inference_mode():
        b.join([spec(i) for i in range(rows - 1)])
        for _ in range(3):  # the running rows decode a little: the joiner meets a ragged batch
            b.step()
        sync(device)
        t0 = time.perf_counter()
        b.join([spec(rows - 1)])
        sync(device)
        join_ms = (time.perf_counter() - t0) * 1e3
        b.step()
    return b, join_ms


def timed_steps(b: Batch, steps: int) -> float:
    """ms per step over ``steps`` steps."""
    device = b.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b.step()
        sync(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (a smoke check of the script)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rows", default="4", help="rows in the batch, comma-separated (default 4)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from decodekit.testing import tiny_model, tiny_tokenizer

        model, tok = tiny_model(), tiny_tokenizer()
        if args.device:
            model = model.to(args.device)
    else:
        model, tok = decodekit.load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tokenize_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS], chat=True)[0]
    device = model.get_input_embeddings().weight.device
    print(f"model: {'tiny random llama' if args.tiny else args.model or 'SmolLM2-135M-Instruct'}, device {device}, "
          f"dtype {next(model.parameters()).dtype}, threads {torch.get_num_threads()}, {args.steps} greedy steps x "
          f"{args.rounds} alternating rounds, static max_batch {args.max_batch} x max_len {args.max_len}\n")
    print("| rows | dynamic ms/step | static ms/step | static / dynamic | dynamic join ms | static join ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        # Both batches live side by side and step in alternating rounds: the same load on both.
        budget = args.steps * args.rounds + 8
        built = {k: build(k, model, tok, ids, rows, budget, args.max_len, max(args.max_batch, rows)) for k in ("dynamic", "static")}
        got: dict[str, list[float]] = {"dynamic": [], "static": []}
        for r in range(args.rounds):
            for kind in (("dynamic", "static") if r % 2 == 0 else ("static", "dynamic")):
                got[kind].append(timed_steps(built[kind][0], args.steps))
        med = {k: (statistics.median(v), built[k][1]) for k, v in got.items()}
        del built
        d, s = med["dynamic"], med["static"]
        print(f"| {rows} | {d[0]:.1f} | {s[0]:.1f} | {s[0] / d[0]:.2f}x | {d[1]:.1f} | {s[1]:.1f} |")


if __name__ == "__main__":
    main()
