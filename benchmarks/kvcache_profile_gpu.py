"""Where a compiled StaticCache decode step spends its time (CUDA): warm-up breakdown, tokens/s
with the stop check read at once vs one step late, and a profiler table of one generation.

    python benchmarks/kvcache_profile_gpu.py [--batch 1] [--new-tokens 256] [--profile]

SmolLM2-135M shapes with random weights (benchmarks/configs/smollm2-135m.json), bf16, greedy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "decodekit-kvcache" / "src")]

import decodekit  # noqa: E402
from decodekit import loop  # noqa: E402
from decodekit.testing import tiny_tokenizer  # noqa: E402
from decodekit_kvcache import StaticCache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ROOT / "benchmarks" / "configs" / "smollm2-135m.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    tok = tiny_tokenizer()
    prompts = ["The quick brown fox jumps over the lazy dog and then"] * a.batch
    s = decodekit.Strategy(cache=StaticCache(), stop_at_eos=False)
    N = a.new_tokens

    def go():
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = decodekit.generate(model, tok, prompts, s, max_new_tokens=N)
        torch.cuda.synchronize()
        return time.perf_counter() - t, r

    t0 = time.perf_counter()
    dt, r = go()
    print(f"first call {dt:.1f} s (stats warmup_s {r.stats.get('warmup_s', 0):.1f} s, process start to here {time.perf_counter() - t0:.1f} s)")
    print(torch._dynamo.utils.compile_times(repr="str"))
    late = [go()[0] for _ in range(a.repeats)]
    lags = loop._StopCheck.__dict__["lags"]  # the staticmethod object itself
    loop._StopCheck.lags = staticmethod(lambda device: False)
    now = [go()[0] for _ in range(a.repeats)]
    loop._StopCheck.lags = lags
    late += [go()[0] for _ in range(a.repeats)]
    B = a.batch
    print(f"\n| stop check | tok/s (b={B}, median) | ms/token-step |\n|---|---:|---:|")
    for name, ts in (("read at once (host sync per step)", now), ("read one step late", late)):
        m = statistics.median(ts)
        print(f"| {name} | {B * N / m:,.0f} | {1000 * m / N:.2f} |")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            go()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
