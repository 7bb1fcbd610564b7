"""The server's decode step and join, dynamic vs static KV cache, without HTTP: one continuous batch
(:class:`decodekit.batching.Batch` vs :class:`decodekit_serve.static.StaticBatch`, the latter with
its eager and its compiled step) of ``--rows`` greedy rows, timed in alternating rounds so every
variant sees the same machine load. A step is timed as the scheduler runs it: ``step()`` then
``poll()`` (the one host sync). Prints a markdown table of ms per step (median over rounds) and ms
for one row to join the running batch (once), and the compiled step's warm-up.

    python benchmarks/serve_static_step.py --rows 4                               # embedded model, CPU
    python benchmarks/serve_static_step.py --rows 1,4,16 --device cuda --dtype bfloat16
    python benchmarks/serve_static_step.py --tiny --rows 4 --steps 8 --rounds 2   # quick check
    python benchmarks/serve_static_step.py --tiny --rows 4 --compile on --compile-backend aot_eager  # CPU trace

``--cohorts N`` admits the rows in N separate joins (a server's requests arrive apart: each join is
its own cohort with its own components, whose per-step host work adds up).
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


def build(kind: str, model, tok, ids: list[list[int]], rows: int, budget: int, max_len: int, max_batch: int,
          cohorts: int, backend: str) -> tuple[Batch, float, float]:
    """A running batch of ``rows`` rows, the ms it took the last one to join the others, and the
    seconds the first step took (the compiled step's compile or capture)."""
    device = model.get_input_embeddings().weight.device
    if kind == "dynamic":
        b = Batch(model, tok)
    else:
        compiled = kind == "static compiled"
        b = StaticBatch(model, tok, max_batch=max_batch, max_len=max_len, shape_stable=True if not compiled else None,
                        compile=compiled, compile_backend=backend)
    spec = lambda i: RowSpec(i, ids[i % len(ids)], Strategy.from_dict({"stop_at_eos": False}), budget, row_seed(0))  # noqa: E731
    with torch.inference_mode():
        first = list(range(rows - 1))
        for part in range(max(1, min(cohorts, rows - 1))):  # each join: one cohort
            b.join([spec(i) for i in first[part::max(1, min(cohorts, rows - 1))]])
        b.poll()
        sync(device)
        t0 = time.perf_counter()
        b.step()
        sync(device)
        warm = time.perf_counter() - t0
        for _ in range(2):  # the running rows decode a little: the joiner meets a ragged batch
            b.step()
        sync(device)
        t0 = time.perf_counter()
        b.join([spec(rows - 1)])
        sync(device)
        join_ms = (time.perf_counter() - t0) * 1e3
        b.step()
        b.poll()
    return b, join_ms, warm


def timed_steps(b: Batch, steps: int) -> float:
    """ms per step over ``steps`` steps."""
    device = b.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b.step()
            b.poll()
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
    ap.add_argument("--cohorts", type=int, default=1, help="separate joins for the running rows (default 1)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="also time the static batch's compiled step (auto: on CUDA)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a CPU trace check)")
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
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    kinds = ["dynamic", "static eager"] + (["static compiled"] if compiled else [])
    print(f"{args.cohorts} cohort(s) of running rows; static eager forward over all max_batch rows (shape-stable)\n")
    print("| rows | kind | ms/step | vs dynamic | join ms | first step s |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in [int(r) for r in args.rows.split(",")]:
        # The batches live side by side and step in alternating rounds: the same load on each.
        budget = args.steps * args.rounds + 8
        built = {k: build(k, model, tok, ids, rows, budget, args.max_len, max(args.max_batch, rows), args.cohorts,
                          args.compile_backend) for k in kinds}
        got: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                got[kind].append(timed_steps(built[kind][0], args.steps))
        med = {k: statistics.median(v) for k, v in got.items()}
        for k in kinds:
            stats = getattr(built[k][0].cache, "stats", {})
            if k == "static compiled" and not stats.get("compiled"):
                k_label = f"{k} (fell back: {stats.get('compile_fallback', '?')[:50]})"
            else:
                k_label = k
            print(f"| {rows} | {k_label} | {med[k]:.2f} | {med[k] / med['dynamic']:.2f}x | {built[k][1]:.1f} | {built[k][2]:.1f} |")
        del built


if __name__ == "__main__":
    main()
