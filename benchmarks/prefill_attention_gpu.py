"""What a prompt of a length not seen before costs in the eager prefill, per SDPA backend.

cuDNN's attention (torch's first choice on Hopper for some shapes) builds an execution plan per
new sequence length; a server sees a new prompt length with almost every request, so that cost
lands in the time to first token. For each backend this times the first and the second forward
of fresh prompt lengths (random token ids, batch 1) on the embedded model or --model.

    python benchmarks/prefill_attention_gpu.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import decodekit

BACKENDS = {
    "default (torch's choice)": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "flash, efficient, math": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


def timed(model, ids, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, default=6, help="fresh prompt lengths per backend")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, _ = decodekit.load_model(args.model, dtype=args.dtype, device=args.device)
    vocab = model.config.vocab_size
    timed(model, torch.randint(vocab, (1, 16), device=args.device), args.device)  # CUDA context, cuBLAS
    print(f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, {args.dtype}, torch {torch.__version__}\n")
    print("| SDPA backends | first forward of a new length, ms (median) | second forward, ms (median) | lengths |")
    print("|---|---:|---:|---|")
    start = 37
    for name, backends in BACKENDS.items():
        lengths = [start + 7 * i for i in range(args.lengths)]  # never seen by an earlier backend
        start = lengths[-1] + 11
        first, second = [], []
        try:
            for n in lengths:
                ids = torch.randint(vocab, (1, n), device=args.device)
                ctx = sdpa_kernel(backends) if backends else torch.autograd.grad_mode.no_grad()
                with ctx:
                    first.append(timed(model, ids, args.device))
                    second.append(timed(model, ids, args.device))
        except RuntimeError as e:
            print(f"| {name} | unavailable: {' '.join(str(e).split())[:80]} | | |")
            continue
        print(f"| {name} | {statistics.median(first) * 1e3:.1f} | {statistics.median(second) * 1e3:.1f} | {lengths[0]}..{lengths[-1]} |",
              flush=True)


if __name__ == "__main__":
    main()
