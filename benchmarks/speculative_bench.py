"""Speculative decoding benchmark: plain greedy vs prompt lookup vs self-speculative (and a draft
model if given), same cache, identical output checked. Prints a markdown table.

CPU (embedded SmolLM2-135M, fp32):
    python benchmarks/speculative_bench.py --max-new-tokens 96
GPU (the lead's run, bf16, static cache = decodekit's own fastest greedy):
    python benchmarks/speculative_bench.py --device cuda --dtype bfloat16 --cache StaticCache --batch 1,8 \
        --max-new-tokens 256 --skip-file skip.json
(``skip.json`` from ``decodekit search-skip default --device cuda --dtype bfloat16 --out skip.json``.)
For the GPU's static, compiled path (batch 1 and 8, warm-up seconds, graphs traced) use
``benchmarks/speculative_gpu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decodekit
from decodekit import Strategy

TEXTS = [
    "The old lighthouse keeper climbed the one hundred and twelve stairs every evening to light the great lamp. "
    "Ships passing the rocky point relied on its beam to find the harbour, and in forty years the light had "
    "never once failed. When the storm of 1952 broke the windows of the lantern room, he held a lantern in "
    "his own hands until dawn.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, "
    "which contain the green pigment chlorophyll. The oxygen is released into the air through tiny pores.",
]
#: Input-grounded prompts (repeat / quote / summarise a given text): where prompt lookup pays.
GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{TEXTS[0]}",
    f"Copy this paragraph exactly:\n\n{TEXTS[1]}",
    f"Quote the first two sentences of this text verbatim:\n\n{TEXTS[0]}",
    f"Summarise this text, reusing its own words:\n\n{TEXTS[1]}",
]
OPEN = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works."]


def make_cache(name: str | None):
    if name is None:
        return None
    return decodekit.get_plugin_manager().component(name)()


def run(model, tok, prompts, drafter, args, cache):
    """Best-of-`repeat` wall time for generating over `prompts` (one batch)."""
    best, result = float("inf"), None
    for _ in range(args.repeat):
        st = Strategy(cache=make_cache(cache), drafter=drafter)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = decodekit.generate(model, tok, prompts, st, max_new_tokens=args.max_new_tokens, chat=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt < best:
            best, result = dt, r
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir / .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache", default=None, help="cache component (default: the installed default; GPU: StaticCache)")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes (rows cycle through the prompt set)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timings per cell")
    ap.add_argument("--lookup-k", type=int, default=10)
    ap.add_argument("--lookup-ngram", type=int, default=3)
    ap.add_argument("--skip-file", default=None, help="SelfSpeculative skip set from `decodekit search-skip`")
    ap.add_argument("--skip-attention", default=None, help="comma-separated layers (instead of --skip-file)")
    ap.add_argument("--self-k", type=int, default=4)
    ap.add_argument("--draft-model", default=None, help="a smaller model of the same family (DraftModel)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; 1 is steadiest on a shared box)")
    ap.add_argument("--prompts", choices=["grounded", "open", "both"], default="both")
    args = ap.parse_args()

    from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = decodekit.load_model(args.model, dtype=args.dtype, device=args.device)
    torch.set_grad_enabled(False)
    drafters = {"plain greedy": None, f"PromptLookup(ngram={args.lookup_ngram}, k={args.lookup_k})": PromptLookup(ngram=args.lookup_ngram, k=args.lookup_k)}
    if args.skip_file:
        drafters[f"SelfSpeculative({args.skip_file})"] = SelfSpeculative.from_file(args.skip_file, k=args.self_k)
    elif args.skip_attention:
        layers = [int(x) for x in args.skip_attention.split(",")]
        drafters[f"SelfSpeculative(attn {layers})"] = SelfSpeculative(skip_attention=layers, k=args.self_k)
    if args.draft_model:
        draft, _ = decodekit.load_model(args.draft_model, dtype=args.dtype, device=args.device)
        drafters["DraftModel(k=4)"] = DraftModel(model=draft, k=4)

    sets = {"grounded": GROUNDED, "open": OPEN}
    names = list(sets) if args.prompts == "both" else [args.prompts]
    # warm-up (allocator, kernels; compiled static-cache steps)
    run(model, tok, GROUNDED[:1], None, argparse.Namespace(**{**vars(args), "repeat": 1, "max_new_tokens": 8}), args.cache)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{dev}, {args.dtype}, cache={args.cache or 'default'}, {args.max_new_tokens} new tokens, best of {args.repeat}\n")
    print("| prompts | batch | strategy | tok/s | speedup | acceptance | mean accepted length | target passes | draft passes | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for set_name in names:
        for B in [int(b) for b in args.batch.split(",")]:
            prompts = [sets[set_name][i % len(sets[set_name])] for i in range(B)]
            base_t, base = None, None
            for label, drafter in drafters.items():
                dt, r = run(model, tok, prompts, drafter, args, args.cache)
                tps = r.stats["new_tokens"] / dt
                if drafter is None:
                    base_t, base = tps, r
                s = r.stats
                print(
                    f"| {set_name} | {B} | {label} | {tps:.1f} | {tps / base_t:.2f}x | "
                    f"{s.get('acceptance_rate', float('nan')):.2f} | {s.get('mean_accepted_length', 1.0):.2f} | "
                    f"{s['forward_passes']} | {s.get('draft_forward_passes', 0)} | {r.token_ids == base.token_ids} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
