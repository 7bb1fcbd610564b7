"""CPU decode speed on the embedded SmolLM2-135M-Instruct (fp32, greedy, 64 new tokens):
decodekit + DynamicCache vs transformers' generate, and decodekit without a cache (NoCache) to
show what the cache buys. Prints a markdown table (median over prompts x repeats).

    python benchmarks/kvcache_cpu.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decodekit

PROMPTS = ["Write a short poem about the sea.", "Explain what a KV cache is in one paragraph.",
           "List three uses of Python."]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-nocache", action="store_true", help="skip the slow NoCache baseline")
    args = ap.parse_args()
    N = args.new_tokens
    model, tok = decodekit.load_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, {N} new tokens, greedy\n")
    times: dict[str, list[float]] = {"HF generate": [], "decodekit DynamicCache": [], "decodekit NoCache": []}
    ratios: list[float] = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        for _ in range(args.repeats):
            with torch.no_grad():
                t0 = time.perf_counter()
                model.generate(**ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
                hf = time.perf_counter() - t0
            t0 = time.perf_counter()
            decodekit.generate(model, tok, prompt, decodekit.Strategy(cache="DynamicCache", stop_at_eos=False), max_new_tokens=N, chat=True)
            dk = time.perf_counter() - t0
            times["HF generate"].append(hf)
            times["decodekit DynamicCache"].append(dk)
            ratios.append(hf / dk)
        if not args.no_nocache:
            t0 = time.perf_counter()
            decodekit.generate(model, tok, prompt, decodekit.Strategy(cache="NoCache", stop_at_eos=False), max_new_tokens=N, chat=True)
            times["decodekit NoCache"].append(time.perf_counter() - t0)
    print("| what | median s | tok/s | speed vs HF generate |\n|---|---:|---:|---:|")
    hf_med = statistics.median(times["HF generate"])
    for name, ts in times.items():
        if ts:
            med = statistics.median(ts)
            print(f"| {name} | {med:.2f} | {N / med:.1f} | {hf_med / med:.2f}x |")
    print(f"\nmedian per-run ratio (HF time / decodekit DynamicCache time): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
