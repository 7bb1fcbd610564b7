"""Generation speed with the sampling chain inside StaticCache's compiled decode step, vs greedy.

The issue's chain, repetition penalty -> temperature -> top-k -> top-p -> min-p -> Multinomial,
runs in the same ``torch.compile(mode="reduce-overhead")`` graph as the forward (one CUDA graph per
step), so its cost should be a few small kernels; the target is chain tok/s >= 0.9 x greedy tok/s.
SmolLM2-135M's architecture with random weights by default (speed depends on shapes, not on
weight values), or the embedded model itself with --real. ``stop_at_eos=False``: every run makes
exactly --new-tokens tokens per row. Prints a markdown table.

    python benchmarks/samplers_gpu.py                          # CUDA, bf16, batch 1, 256 new tokens
    python benchmarks/samplers_gpu.py --batch 1,32 --real
    python benchmarks/samplers_gpu.py --device cpu --new-tokens 16    # CPU check (eager step)
    python benchmarks/samplers_gpu.py --device cpu --new-tokens 16 --compile-backend inductor --tiny

On CPU the step is compiled only when --compile-backend is given (Inductor's C++ backend takes
minutes for 30 layers on a small box); "fell back" says whether the compiled step failed and the
eager step ran instead (stats ``compile_fallback``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Runs from a bare checkout too (the plugins need not be installed).
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "decodekit-kvcache" / "src"), str(ROOT / "plugins" / "decodekit-samplers" / "src")]

import decodekit  # noqa: E402
import decodekit_samplers as S  # noqa: E402
from decodekit.testing import tiny_config, tiny_tokenizer  # noqa: E402
from decodekit_kvcache import StaticCache  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time in a land far away there lived",
             "In the beginning the universe was created. This has made", "def fibonacci(n): return n if n < 2 else"]


def chain() -> list:
    return [S.RepetitionPenalty(1.1), S.Temperature(0.7), S.TopK(40), S.TopP(0.9), S.MinP(0.05)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args):
    """(model, tokenizer, label). Random weights: prompts come from the tiny tokenizer, whose ids
    are valid in any vocabulary."""
    dtype = getattr(torch, args.dtype)
    if args.real:
        model, tok = decodekit.load_model(dtype=args.dtype, device=args.device)
        return model, tok, "SmolLM2-135M-Instruct (embedded)"
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_config("llama", vocab_size=49152) if args.tiny else AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    model.generation_config.pad_token_id = 0
    label = "tiny Llama, vocab 49,152" if args.tiny else f"random weights ({Path(args.config).name})"
    return model, tiny_tokenizer(), label


def run(model, tok, prompts, strategy, N, device, repeats):
    """(median seconds, first-call seconds, stats of the first call)."""
    sync(device)
    t0 = time.perf_counter()
    first = decodekit.generate(model, tok, prompts, strategy, max_new_tokens=N, seed=0)
    sync(device)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        decodekit.generate(model, tok, prompts, strategy, max_new_tokens=N, seed=0)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first_s, first.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "smollm2-135m.json"))
    ap.add_argument("--real", action="store_true", help="the embedded SmolLM2-135M-Instruct instead of random weights")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama with a 49,152 vocabulary (quick CPU compile check)")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-backend", default=None, help="default: inductor on CUDA; on CPU the step is eager unless given")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = device.type == "cuda" or args.compile_backend is not None
    backend = args.compile_backend or "inductor"
    model, tok, label = build(args)
    N = args.new_tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, {label}, {N} new tokens, "
          f"StaticCache {'compiled (' + backend + ')' if compiled else 'eager'}\n")
    rows = []
    for B in [int(b) for b in args.batch.split(",")]:
        prompts = [SENTENCES[i % len(SENTENCES)] for i in range(B)]
        res = {}
        for what, procs, sampler in [("greedy", [], "Greedy"), ("chain + Multinomial", chain(), "Multinomial")]:
            strategy = decodekit.Strategy(cache=StaticCache(compile=compiled, compile_backend=backend), processors=procs,
                                          sampler=sampler, stop_at_eos=False)
            med, first_s, st = run(model, tok, prompts, strategy, N, device, args.repeats)
            res[what] = B * N / med
            fell = st.get("compile_fallback")
            # warm-up: the first compiled step of the first call (tracing + Inductor + CUDA-graph capture)
            rows.append((what, B, B * N / med, 1e3 * med / N, st.get("warmup_s") if compiled else None, st.get("compiled_steps", 0),
                         ("yes: " + fell[:80]) if fell else "no"))
            print(f"  {what} b={B}: {B * N / med:,.1f} tok/s, first call {first_s:.1f} s, fell back: {rows[-1][-1]}", flush=True)
        rows.append(("chain / greedy", B, res["chain + Multinomial"] / res["greedy"], None, None, None, None))

    print("\n| strategy | batch | tok/s | ms / step | warm-up s (first compiled step) | compiled steps (first call) | fell back |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for what, B, tps, ms, warm, steps, fell in rows:
        if ms is None:
            print(f"| **{what}** | {B} | **{tps:.3f}** | | | | |")
            continue
        print(f"| {what} | {B} | {tps:,.1f} | {ms:.2f} | {'-' if warm is None else f'{warm:.1f}'} | {steps} | {fell} |")


if __name__ == "__main__":
    main()
