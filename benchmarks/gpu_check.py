"""GPU check: the compiled StaticCache step with samplers, against the eager DynamicCache path.

SmolLM2-135M's shapes with random weights (no model file needed):
1. fp32: compiled static greedy and seeded chain+Multinomial are token-identical to DynamicCache;
2. bf16, batch 1, 256 tokens: tokens/s of greedy vs the sampling chain on the compiled static path.

    python benchmarks/gpu_check.py
"""

import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import decodekit
from decodekit import Strategy
from decodekit.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAIN = [{"name": "RepetitionPenalty", "repetition_penalty": 1.2}, {"name": "Temperature", "temperature": 0.8},
         {"name": "TopK", "top_k": 50}, {"name": "TopP", "top_p": 0.9}, {"name": "MinP", "min_p": 0.05}]
PROMPTS = ["The quick brown fox jumps over", "Once upon a time", "def fibonacci(n):", "In the beginning"]


def model(dtype):
    cfg = AutoConfig.from_pretrained(ROOT / "benchmarks" / "configs" / "smollm2-135m.json")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").cuda().eval()


def run(m, tok, cache, sampled, n, prompts):
    s = Strategy(cache=cache, processors=CHAIN if sampled else [], sampler="Multinomial" if sampled else None, stop_at_eos=False)
    return decodekit.generate(m, tok, prompts, s, max_new_tokens=n, seed=7)


tok = tiny_tokenizer()
m = model(torch.float32)
print("| fp32 check (batch 4, 64 tokens) | rows identical to DynamicCache |\n|---|---|")
for sampled in (False, True):
    ref = run(m, tok, {"name": "DynamicCache"}, sampled, 64, PROMPTS).token_ids
    got = run(m, tok, {"name": "StaticCache", "max_len": 256}, sampled, 64, PROMPTS).token_ids
    print(f"| {'chain + Multinomial' if sampled else 'greedy'} | {sum(a == b for a, b in zip(ref, got))}/4 |")

m = model(torch.bfloat16)
print("\n| bf16 compiled StaticCache, batch 1, 256 tokens | tok/s | warm-up s |\n|---|---|---|")
rates = {}
for sampled in (False, True, False, True):
    cache = {"name": "StaticCache", "max_len": 512}
    t = time.perf_counter()
    run(m, tok, cache, sampled, 8, PROMPTS[:1])  # warm-up (compiles on first use)
    warm = time.perf_counter() - t
    r = run(m, tok, cache, sampled, 256, PROMPTS[:1])
    rates[sampled] = r.stats["tokens_per_s"]
    print(f"| {'chain + Multinomial' if sampled else 'greedy'} | {r.stats['tokens_per_s']:.0f} | {warm:.1f} |")
print(f"\nchain costs {100 * (1 - rates[True] / rates[False]):.1f}% of greedy tokens/s")
