"""Host cost of dynamo's guards on the compiled decode step: StaticCache(module_guards=True), every
nn.Module attribute re-checked before each step (dynamo's default), vs False (the default here:
one compiled step per model object, module guards skipped). Greedy tok/s, interleaved runs, and
whether the compiled step fell back. A small model makes the step host-bound, where guards show.

    python benchmarks/guards_gpu.py                      # CUDA, bf16, SmolLM2-135M shapes, 2 and 30 layers
    python benchmarks/guards_gpu.py --layers 2 --new-tokens 128
    python benchmarks/guards_gpu.py --device cpu --compile-backend eager --layers 2 --new-tokens 16   # smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import decodekit
from decodekit import Strategy
from decodekit.testing import tiny_tokenizer

CONFIG = Path(__file__).resolve().parent / "configs" / "smollm2-135m.json"


def model_of(layers: int, device: str, dtype: torch.dtype):
    d = json.loads(CONFIG.read_text())
    cfg = LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    cfg.num_hidden_layers = layers
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def run(model, tok, guards: bool, n: int, backend: str, device: str):
    s = Strategy(cache={"name": "StaticCache", "compile": True, "compile_backend": backend, "module_guards": guards},
                 stop_at_eos=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = decodekit.generate(model, tok, "The quick brown fox jumps over", s, max_new_tokens=n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t), r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", default="2,30")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile-backend", default="inductor")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = tiny_tokenizer()
    print("| layers | module guards | tok/s (median) | ms / token | warm-up s | fell back | same tokens |\n|---:|---|---:|---:|---:|---|---|")
    for L in [int(x) for x in a.layers.split(",")]:
        model = model_of(L, a.device, getattr(torch, a.dtype))
        res = {True: [], False: []}
        first = {}
        for i in range(a.rounds + 1):  # interleaved; round 0 compiles
            for g in (False, True):
                tps, r = run(model, tok, g, a.new_tokens, a.compile_backend, a.device)
                if i == 0:
                    first[g] = r
                else:
                    res[g].append(tps)
        for g in (False, True):
            st = first[g].stats
            med = statistics.median(res[g])
            print(f"| {L} | {'every step' if g else 'skipped'} | {med:.1f} | {1e3 / med:.2f} | {st.get('warmup_s', 0):.1f} | "
                  f"{'yes: ' + st['compile_fallback'][:60] if 'compile_fallback' in st else 'no'} | "
                  f"{first[g].token_ids == first[True].token_ids} |", flush=True)


if __name__ == "__main__":
    main()
