"""Speculative decoding on the static, compiled path (issue #6): plain greedy vs PromptLookup vs
SelfSpeculative (vs DraftModel when a smaller same-vocabulary model is given), batch 1 and 8, target
on decodekit-kvcache's StaticCache with its compiled decode step, drafts on compiled static passes.
Prints one markdown table: tok/s, ratio to plain greedy, acceptance rate, mean accepted length,
warm-up seconds (first generation's compile + capture), graphs traced, identical output.

GPU (bf16, the embedded SmolLM2-135M or DECODEKIT_DEFAULT_GGUF; ~4 minutes, mostly compiling):
    python benchmarks/speculative_gpu.py --device cuda --dtype bfloat16
    python benchmarks/speculative_gpu.py --device cuda --dtype bfloat16 --skip-file skip.json
CPU check with tiny sizes (dynamo traces every graph, no code generation):
    python benchmarks/speculative_gpu.py --compile-backend eager --batch 1,2 --max-new-tokens 24 --repeat 1

Widths: lookup k=7 and self-speculative k=7 make the verify width 1+k = 8, a power of two, so the
target's compiled graph per batch size is shared by both drafters (StaticCache buckets widths to
powers of two; k=10 would verify 16 positions for 11 real ones). Without --skip-file the skip set
comes from a quick search: teacher-forced top-1 agreement of each candidate skip set with the full
model on plain greedy outputs (one eager forward per candidate, no compiling), ranked by the
expected speedup (1 - a^(k+1)) / ((1 - a)(k c + 1)) with c the fraction of sublayers kept
(Leviathan et al. 2023; on a GPU a small model's step is launch-bound, so cost follows kernels).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._dynamo.utils

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
MORE_TEXTS = [
    "The village market opens at six on Saturdays. Farmers bring apples, pears and honey from the hills, "
    "and the baker sells bread that is still warm. By noon the square is empty again, and only the pigeons "
    "remain to look for crumbs between the stones.",
    "A bicycle chain should be cleaned and oiled every few hundred kilometres. Dirt mixed with old oil wears "
    "the teeth of the gears, and a worn chain slips under load. Wipe it with a dry cloth, add one drop of oil "
    "to each link, and wipe off what is left.",
    "The library will close for two weeks in August while the roof is repaired. Books due during that time "
    "may be returned in the box by the side door, and no late fees will be charged. The reading room will "
    "reopen on the first Monday of September.",
    "Honey bees communicate the location of flowers with a dance. A bee that has found food walks in a "
    "figure of eight on the comb, and the angle of the straight part tells the others the direction of the "
    "flowers relative to the sun.",
    "To make a simple tomato sauce, warm olive oil in a pan and add a chopped onion. Cook it slowly until it "
    "is soft, then add two cans of tomatoes, a pinch of salt and a few basil leaves, and let it simmer for "
    "twenty minutes.",
    "The train to the coast leaves from platform four at ten past nine. It stops at every station until the "
    "river crossing and then runs fast to the sea. Passengers with bicycles should board the last carriage.",
]
#: Input-grounded prompts (repeat / quote / summarise a given text): where prompt lookup pays.
#: "mixed": four tasks; SmolLM2-135M copies the lighthouse text but paraphrases the photosynthesis
#: one (prompts 1 and 3 accept little), and a batch runs as many steps as its slowest row.
GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{TEXTS[0]}",
    f"Copy this paragraph exactly:\n\n{TEXTS[1]}",
    f"Quote the first two sentences of this text verbatim:\n\n{TEXTS[0]}",
    f"Summarise this text, reusing its own words:\n\n{TEXTS[1]}",
]


#: "repeat": one task, eight different texts (written once, not picked by how well they copy).
REPEAT = [f"Repeat the following text exactly, word for word:\n\n{t}" for t in TEXTS + MORE_TEXTS]
PROMPT_SETS = {"mixed": GROUNDED, "repeat": REPEAT}


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def strategy(args, drafter) -> Strategy:
    # One buffer length for every prompt set and strategy: the length is a compiled graph's static
    # shape, and a default-sized cache (longest prompt + budget, rounded to 64) would compile anew
    # for each prompt set.
    cache = {"name": "StaticCache", "compile": True, "compile_backend": args.compile_backend, "max_len": args.max_len}
    return Strategy(cache=cache, drafter=drafter)


def first_token_s(model, tok, prompts, drafter, args) -> float:
    """Seconds to the first streamed text (setup + prefill + first step): the per-generation cost
    that a short answer does not amortise."""
    sync(args.device)
    t0 = time.perf_counter()
    it = decodekit.stream(model, tok, prompts, strategy(args, drafter), max_new_tokens=args.max_new_tokens, chat=True)
    next(it)
    sync(args.device)
    dt = time.perf_counter() - t0
    it.close()
    return dt


def generate(model, tok, prompts, drafter, args):
    sync(args.device)
    t0 = time.perf_counter()
    r = decodekit.generate(model, tok, prompts, strategy(args, drafter), max_new_tokens=args.max_new_tokens, chat=True)
    sync(args.device)
    return time.perf_counter() - t0, r


def measure(model, tok, prompts, drafter, args) -> dict:
    """A cold generation (compiles what it needs; its warm-up seconds reported), then best of N."""
    g0 = graphs()
    _, cold = generate(model, tok, prompts, drafter, args)
    warm = cold.stats.get("warmup_s", 0.0) + cold.stats.get("draft_warmup_s", 0.0)
    best, result = float("inf"), cold
    for _ in range(args.repeat):
        dt, r = generate(model, tok, prompts, drafter, args)
        if dt < best:
            best, result = dt, r
    first = min(first_token_s(model, tok, prompts, drafter, args) for _ in range(2))
    return {"tps": result.stats["new_tokens"] / best, "r": result, "warm": warm, "graphs": graphs() - g0, "first": first}


# ---------------------------------------------------------------- quick skip-set search
def candidates(L: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Blocks of middle sublayers (FACTS.md: SmolLM2's middle attention sublayers agree best)."""
    out = []
    mid = L // 3
    for n in (2, 3, 4, 6, 8, 10):
        out.append((tuple(range(mid, mid + n)), ()))
    for n in (2, 4):
        out.append(((), tuple(range(mid, mid + n))))
        out.append((tuple(range(mid, mid + n)), tuple(range(mid, mid + n))))
    return [(a, m) for a, m in out if max(a + m, default=0) < L]


@torch.no_grad()
def quick_search(model, tok, args) -> tuple[list[int], list[int], str]:
    from decodekit.api import prepare
    from decodekit_speculative.self_speculative import decoder_layers, skipped_view

    L = len(decoder_layers(model))
    # teacher forcing on what the full model itself generates greedily (that is what gets verified)
    seqs = []
    for p in GROUNDED[:2]:
        r = decodekit.generate(model, tok, [p], Strategy(), max_new_tokens=48, chat=True)
        state, _ = prepare(model, tok, [p], Strategy(), max_new_tokens=1, chat=True)
        seqs.append((state.prompt_ids[0], r.token_ids[0]))
    dev = next(model.parameters()).device
    full = []
    for prompt, new in seqs:
        x = torch.tensor([prompt + new], device=dev)
        full.append((x, len(prompt), model(x).logits.argmax(-1)))
    k = args.self_k
    best = None
    for attn, mlp in candidates(L):
        view = skipped_view(model, attn, mlp)
        agree = total = 0
        for x, P, ref in full:
            got = view(x).logits.argmax(-1)
            agree += int((got[0, P - 1:-1] == ref[0, P - 1:-1]).sum())
            total += ref.shape[1] - P
        a = min(agree / total, 0.999)
        c = 1 - (len(attn) + len(mlp)) / (2 * L)
        speed = (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1))
        if best is None or speed > best[0]:
            best = (speed, list(attn), list(mlp), a)
    speed, attn, mlp, a = best
    return attn, mlp, f"quick search: agreement {a:.2f}, expected {speed:.2f}x by the cost model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir / .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile-backend", default="inductor", help="'eager' on CPU: trace without codegen")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timed generations after the cold one")
    ap.add_argument("--lookup-k", type=int, default=7)
    ap.add_argument("--lookup-ngram", type=int, default=3)
    ap.add_argument("--self-k", type=int, default=7)
    ap.add_argument("--skip-file", default=None, help="SelfSpeculative skip set from `decodekit search-skip`")
    ap.add_argument("--draft-model", default=None, help="a smaller model with the same vocabulary (DraftModel)")
    ap.add_argument("--draft-k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="also profile one warm prompt-lookup generation per batch size")
    ap.add_argument("--prompts", default="mixed,repeat", help="prompt sets: mixed (four grounded tasks), repeat (eight texts)")
    ap.add_argument("--max-len", type=int, default=512, help="StaticCache slots per row (one compiled shape for all runs)")
    args = ap.parse_args()

    from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = decodekit.load_model(args.model, dtype=args.dtype, device=args.device)
    torch.set_grad_enabled(False)
    notes = []
    drafters = {
        "plain greedy": None,
        f"PromptLookup(ngram={args.lookup_ngram}, k={args.lookup_k})": PromptLookup(ngram=args.lookup_ngram, k=args.lookup_k, fixed_width=True),
    }
    if args.skip_file:
        self_spec = SelfSpeculative.from_file(args.skip_file, k=args.self_k)
        notes.append(f"SelfSpeculative skip set from {args.skip_file}")
    else:
        attn, mlp, how = quick_search(model, tok, args)
        self_spec = SelfSpeculative(skip_attention=attn, skip_mlp=mlp, k=args.self_k)
        notes.append(how)
    drafters[f"SelfSpeculative(attn {self_spec.skip_attention}, mlp {self_spec.skip_mlp}, k={args.self_k})"] = self_spec
    if args.draft_model:
        draft, _ = decodekit.load_model(args.draft_model, dtype=args.dtype, device=args.device)
        drafters[f"DraftModel(k={args.draft_k})"] = DraftModel(model=draft, k=args.draft_k)
    else:
        notes.append(
            "DraftModel: not measured; no smaller model shares SmolLM2-135M's vocabulary offline "
            "(135M is the family's smallest); pass --draft-model to add a row"
        )

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    rows, done = [], []
    runs = [(name, B) for B in [int(b) for b in args.batch.split(",")] for name in args.prompts.split(",")]
    for name, B in runs:
        prompts = [PROMPT_SETS[name][i % len(PROMPT_SETS[name])] for i in range(B)]
        if prompts in done:  # batch 1: both sets start with the same prompt
            continue
        done.append(prompts)
        base = None
        for label, drafter in drafters.items():
            m = measure(model, tok, prompts, drafter, args)
            if base is None:
                base = m
            s = m["r"].stats
            acc = s.get("acceptance_rate")
            rows.append(
                f"| {name} | {B} | {label} | {m['tps']:.1f} | {m['tps'] / base['tps']:.2f}x | "
                f"{'-' if acc is None else f'{acc:.2f}'} | {s.get('mean_accepted_length', 1.0):.2f} | {m['warm']:.1f} | "
                f"{m['first'] * 1e3:.1f} | {m['graphs']} | {s['forward_passes']} | {s.get('draft_forward_passes', 0)} | {m['r'].token_ids == base['r'].token_ids} |"
            )
            print(rows[-1], flush=True)
    print(f"\n{dev}, {args.dtype}, StaticCache(compile=True, backend={args.compile_backend}, max_len={args.max_len}), grounded prompts, "
          f"{args.max_new_tokens} new tokens, best of {args.repeat} after a cold run; total {time.perf_counter() - t_start:.0f} s\n")
    print("| prompts | batch | strategy | tok/s | ratio | acceptance | mean accepted length | warm-up s | first token ms | graphs traced | target passes | draft passes | identical |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    for n in notes:
        print(f"\n- {n}")
    print(json.dumps({"torch": torch.__version__, "recompile_limit": getattr(torch._dynamo.config, "recompile_limit", None)}))
    if args.profile:
        lookup = next(d for d in drafters.values() if isinstance(d, PromptLookup))
        for B in [int(b) for b in args.batch.split(",")]:
            profile(model, tok, [GROUNDED[i % len(GROUNDED)] for i in range(B)], lookup, args)


def profile(model, tok, prompts, drafter, args) -> None:
    """Where a warm speculative generation spends its time: host ops per step, device syncs, GPU
    kernel time. Shows whether a step is host-bound (eager ops, syncs) or GPU-bound."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    generate(model, tok, prompts, drafter, args)  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with tprofile(activities=acts) as prof:
        dt, r = generate(model, tok, prompts, drafter, args)
    steps = r.stats["forward_passes"]
    ev = prof.key_averages()
    syncs = {e.key: e.count for e in ev if "Synchronize" in e.key or e.key in ("aten::_local_scalar_dense", "cudaMemcpyAsync")}
    aten = [e for e in ev if e.key.startswith("aten::")]
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in ev if getattr(e, "device_type", None) is not None
                 and str(e.device_type).endswith("CUDA"))
    print(f"\n#### profile: prompt lookup, batch {len(prompts)}: {steps} steps, {dt / steps * 1e3:.2f} ms/step (profiled), "
          f"aten ops/step {sum(e.count for e in aten) / steps:.0f}, GPU kernel time/step {gpu_us / steps / 1e3:.2f} ms")
    print(f"syncs and copies: {syncs}")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
