"""GPU decode speed: decodekit's StaticCache compiled step vs transformers' generate.

SmolLM2-135M's architecture with random weights (speed depends on shapes, not weight values),
greedy, ``Strategy(stop_at_eos=False)`` so every run makes exactly --new-tokens tokens per row.
Prints markdown tables. On a CUDA box:

    python benchmarks/kvcache_gpu.py --device cuda --dtype bfloat16

Checked on CPU with a tiny config:  python benchmarks/kvcache_gpu.py --tiny --new-tokens 16 --compile-backend eager
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "decodekit-kvcache" / "src")]  # runs from a bare checkout too

import decodekit  # noqa: E402
from decodekit.testing import tiny_config, tiny_tokenizer  # noqa: E402
from decodekit_kvcache import DynamicCache, StaticCache  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time in a land far away there lived",
             "In the beginning the universe was created. This has made", "def fibonacci(n): return n if n < 2 else"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def build(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    cfg = tiny_config("llama") if args.tiny else AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    model.generation_config.pad_token_id = 0
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "smollm2-135m.json"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama (CPU check of this script)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--only", default="all", help="all | decodekit-static (e.g. a second process for the warm compile cache)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    model, tok = build(args), tiny_tokenizer()  # prompts only: ids the tiny tokenizer makes are valid in any vocab
    N = args.new_tokens
    rows, results = [], {}
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{args.dtype}, {N} new tokens, greedy, random weights ({'tiny' if args.tiny else Path(args.config).name})\n")

    def record(name, B, seconds_list, warm=None, tokens=None):
        med = statistics.median(seconds_list)
        results[(name, B)] = dict(tok_s=B * N / med, ms_step=1000 * med / N, warmup_s=warm, tokens=tokens)
        print(f"  {name} b={B}: {B * N / med:,.0f} tok/s ({1000 * med / N:.2f} ms/step)" + (f", warm-up {warm:.1f} s" if warm is not None else ""), flush=True)

    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [SENTENCES[i % len(SENTENCES)] * (1 + i % 2) for i in range(B)]
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        hf_kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)

        def section(name, fn):
            try:
                fn()
            except Exception:  # one failing section must not lose the others' figures
                print(f"  {name} b={B} FAILED:\n" + traceback.format_exc(limit=4), flush=True)

        def hf_eager():
            with torch.no_grad():
                model.generate(**enc, **dict(hf_kw, max_new_tokens=4, min_new_tokens=4))  # cuBLAS/alloc warm-up
                ts = [timed(lambda: model.generate(**enc, **hf_kw), device)[0] for _ in range(args.repeats)]
            record("HF generate eager", B, ts)

        def hf_static():
            with torch.no_grad():
                warm, _ = timed(lambda: model.generate(**enc, **hf_kw, cache_implementation="static"), device)
                ts = [timed(lambda: model.generate(**enc, **hf_kw, cache_implementation="static"), device)[0] for _ in range(args.repeats)]
            record("HF generate static+compile", B, ts, warm)

        def dk(name, make_cache):
            def run():
                strategy = decodekit.Strategy(cache=make_cache(), stop_at_eos=False)
                go = lambda: decodekit.generate(model, tok, prompts, strategy, max_new_tokens=N)  # noqa: E731
                first, out = timed(go, device)
                warm = out.stats.get("warmup_s")
                ts, last = [], out
                for _ in range(args.repeats):
                    dt, last = timed(go, device)
                    ts.append(dt)
                record(name, B, ts, first if warm is not None else None, last.token_ids)
            section(name, run)

        if args.only == "all":
            section("HF generate eager", hf_eager)
            section("HF generate static+compile", hf_static)
            dk("decodekit DynamicCache", DynamicCache)
        dk("decodekit StaticCache compiled", lambda: StaticCache(compile=device.type == "cuda" or args.compile_backend != "inductor",
                                                                  compile_backend=args.compile_backend))
        a, b = results.get(("decodekit DynamicCache", B)), results.get(("decodekit StaticCache compiled", B))
        if a and b:
            same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
            prefix = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a["tokens"], b["tokens"])]
            print(f"  greedy identity, compiled static vs dynamic: {same}/{B} rows identical, mean common prefix {statistics.mean(prefix):.1f}/{N}")
            results[("identity", B)] = dict(rows_identical=same, rows=B, mean_prefix=statistics.mean(prefix))

    print("\n| what | batch | tok/s (aggregate) | ms/step | warm-up s (first call) | vs HF eager | vs HF static+compile |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, B), r in results.items():
        if name == "identity":
            continue
        e, c = results.get(("HF generate eager", B)), results.get(("HF generate static+compile", B))
        ratio = lambda ref: f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"  # noqa: E731
        warm = f"{r['warmup_s']:.1f}" if r["warmup_s"] is not None else "-"
        print(f"| {name} | {B} | {r['tok_s']:,.0f} | {r['ms_step']:.2f} | {warm} | {ratio(e)} | {ratio(c)} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({f"{k[0]}|{k[1]}": {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
