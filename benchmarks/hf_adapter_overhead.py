"""Per-step overhead of decodekit.hf's LogitsProcessor adapter inside transformers' generate, against
transformers' own equivalent processors (the same chain), and of custom_generate against generate.

    python benchmarks/hf_adapter_overhead.py                                  # CPU, tiny sizes
    python benchmarks/hf_adapter_overhead.py --device cuda --dtype bfloat16 --new-tokens 256 --batch 1 8

Prints markdown tables. The model is the embedded SmolLM2-135M-Instruct unless --tiny.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LogitsProcessorList

import decodekit
import decodekit.hf as dkhf

CHAINS = {
    # name: (transformers generate kwargs, decodekit processors factory)
    "rep+ngram": (dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
                  lambda s: [s.RepetitionPenalty(1.3), s.NoRepeatNGram(3)]),
    "rep+temp+topk+topp": (dict(repetition_penalty=1.3, do_sample=True, temperature=0.8, top_k=50, top_p=0.9),
                           lambda s: [s.RepetitionPenalty(1.3), s.Temperature(0.8), s.TopK(50), s.TopP(0.9)]),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random model (processor cost dominates)")
    args = ap.parse_args()
    import decodekit_samplers as samplers

    if args.tiny:
        from decodekit.testing import tiny_model, tiny_tokenizer

        model, tok = tiny_model("llama").to(args.device), tiny_tokenizer()
    else:
        model, tok = decodekit.load_model(dtype=args.dtype, device=args.device)
    device = model.device
    prompt = "Write a short story about a robot who learns to paint, with many details."
    n = args.new_tokens
    print(f"device {device}, dtype {model.dtype}, {n} new tokens, min of {args.repeat} runs\n")
    print("| chain | batch | transformers ms/step | adapter ms/step | overhead ms/step | custom_generate ms/step |")
    print("|---|---|---|---|---|---|")
    for name, (hf_kw, make) in CHAINS.items():
        for B in args.batch:
            ids = tok([prompt] * B, return_tensors="pt").to(device)
            common = dict(max_new_tokens=n, min_new_tokens=n, eos_token_id=None)  # fixed length: per-step figures compare
            sample = hf_kw.get("do_sample", False)

            def theirs():
                torch.manual_seed(0)
                model.generate(**ids, **common, **hf_kw)

            def ours():
                torch.manual_seed(0)
                lp = LogitsProcessorList([dkhf.as_logits_processor(make(samplers), tok)])
                model.generate(**ids, **common, do_sample=sample, logits_processor=lp)

            def custom():
                model.generate(**ids, max_new_tokens=n, custom_generate=dkhf.generate, seed=0,
                               strategy=decodekit.Strategy(processors=make(samplers), sampler=samplers.Multinomial() if sample else None, stop_at_eos=False))

            t_h, t_o, t_c = (timed(f, device, args.repeat) * 1e3 / n for f in (theirs, ours, custom))
            print(f"| {name} | {B} | {t_h:.2f} | {t_o:.2f} | {t_o - t_h:+.2f} | {t_c:.2f} |")


if __name__ == "__main__":
    main()
