"""decodekit-fsm benchmarks: build time/memory, per-step mask cost, generation overhead, leak rate.

    python benchmarks/fsm_bench.py --sizes 100 1000 10000 --tokenizers smollm2 gemma3
    python benchmarks/fsm_bench.py --device cuda --dtype bfloat16 --gen-tokens 256   # on a GPU box

Prints markdown tables. Word lists are synthetic (pronounceable 5-12 letter strings, seeded).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc

import torch

import decodekit
from decodekit_fsm import BannedWords, token_bytes
from decodekit_fsm.banned import _ENGINES


def words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    out = set()
    while len(out) < n:
        L = rng.randint(5, 12)
        out.add("".join(rng.choice(cons if i % 2 == 0 else vow) for i in range(L)))
    return sorted(out)


def load_tok(name: str):
    from transformers import AutoTokenizer

    from decodekit.models import cache_dir, default_model_dir

    if name == "smollm2":
        return AutoTokenizer.from_pretrained(str(default_model_dir()))
    import importlib.util
    import sys

    sys.path.insert(0, "plugins/decodekit-fsm/tests")
    from test_fsm_real_tokenizers import gemma_tok  # noqa: E402 (reuses the cached tokenizer)

    return gemma_tok()


def bench_build(toks: dict, sizes: list[int]) -> None:
    print("\n### Build time and memory\n\n| tokenizer | vocab | words | build s | peak MB (tracemalloc) | engine MB |\n|---|---|---|---|---|---|")
    for name, tok in toks.items():
        token_bytes(tok)  # cached per tokenizer once (disk + memory)
        for n in sizes:
            _ENGINES.clear()
            tracemalloc.start()
            t0 = time.perf_counter()
            eng = BannedWords(words=words(n)).engine_for(tok, len(tok))
            dt = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            print(f"| {name} | {len(tok)} | {n} | {dt:.2f} | {peak:.0f} | {eng.nbytes() / 2**20:.0f} |")


def bench_step(toks: dict, n_words: int, batches: list[int], steps: int, device: str) -> None:
    """Per-step processor cost on text that walks through many automaton states (masks warm after
    first visit: both cold and warm medians are shown)."""
    print(f"\n### Per-step cost ({n_words} words, device {device})\n\n| tokenizer | batch | cold median µs/row | warm median µs/row | p90 warm µs/row |\n|---|---|---|---|---|")
    from decodekit.state import DecodeState

    for name, tok in toks.items():
        ws = words(n_words)
        text = " ".join(random.Random(1).choice(ws)[:-1] + " and some more text" for _ in range(40))
        ids = tok(text, add_special_tokens=False)["input_ids"][:steps]
        V = len(tok)
        for B in batches:
            _ENGINES.clear()
            bw = BannedWords(words=ws)
            st = DecodeState(model=None, tokenizer=tok, device=torch.device(device), batch_size=B, vocab_size=V, prompt_ids=[[0]] * B,
                             prompt_lengths=torch.ones(B, dtype=torch.long), seeds=torch.zeros(B, dtype=torch.long), max_new_tokens=10**6,
                             eos_token_ids=torch.tensor([], dtype=torch.long), pad_token_id=0)
            st.proposals = torch.zeros(B, 0, dtype=torch.long, device=device)
            st.finished = torch.zeros(B, dtype=torch.bool, device=device)
            bw.setup(st)
            scores = torch.randn(B, 1, V, device=device)
            for label in ("cold", "warm"):
                bw.setup(st)
                times = []
                for i, t in enumerate(ids):
                    st.scores = scores
                    t0 = time.perf_counter()
                    bw.process_logits(st)
                    st.step_tokens = torch.full((B, 1), t, dtype=torch.long)
                    st.accepted = torch.ones(B, dtype=torch.long)
                    st.rolled_back = torch.zeros(B, dtype=torch.long)
                    bw.accept(st)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) / B * 1e6)
                if label == "cold":
                    cold = statistics.median(times)
            warm = statistics.median(times)
            p90 = sorted(times)[int(0.9 * len(times))]
            print(f"| {name} | {B} | {cold:.0f} | {warm:.0f} | {p90:.0f} |")


LEAK_PROMPTS = [
    "Repeat after me exactly: {w} {w} {w}.",
    "Spell the word {w} letter by letter, then write it in capitals.",
    "Write the plural of {w} and use {w} in a sentence.",
    "Write {w} with hyphens between the syllables.",
    "Write a Python variable named {w}_count and a function get_{w}().",
    "Say {W} three times in capital letters.",
]


def bench_generate(device: str, dtype: str, n_tokens: int, banned_words: list[str]) -> None:
    model, tok = decodekit.load_model(dtype=dtype, device=device)
    # Speed: 1,000 banned words vs none.
    ws = words(1000)
    prompt = "Tell me a short story about a cat and a dog."
    rows = []
    for label, procs in (("no ban", []), ("BannedWords 1,000 words (mask)", [BannedWords(words=ws)])):
        res = decodekit.generate(model, tok, prompt, decodekit.Strategy(processors=procs), max_new_tokens=n_tokens, chat=True)
        rows.append((label, res.stats["tokens_per_s"]))
    print(f"\n### Generation speed (SmolLM2-135M, {device}, {dtype or 'float32'}, {n_tokens} tokens, batch 1)\n\n| strategy | tok/s | relative |\n|---|---|---|")
    for label, tps in rows:
        print(f"| {label} | {tps:.1f} | {tps / rows[0][1]:.3f} |")

    # Leak rate.
    prompts = [p.format(w=w, W=w.upper()) for w in banned_words for p in LEAK_PROMPTS]

    def leaked(texts):
        return sum(any(w in t.casefold() for w in banned_words) for t in texts)

    bad = []
    for w in banned_words:
        for v in (w, " " + w, w.capitalize(), " " + w.capitalize(), w.upper(), " " + w.upper()):
            bad.append(tok(v, add_special_tokens=False)["input_ids"])

    class HFBadWords(decodekit.Processor):
        def setup(self, state):
            from transformers import NoBadWordsLogitsProcessor

            self._p = NoBadWordsLogitsProcessor(bad, eos_token_id=tok.eos_token_id)

        def process_logits(self, state):
            return self._p(state.committed_ids(), state.scores[:, 0].clone())[:, None]

    configs = [("no ban", []), ("transformers bad_words_ids (canonical tokenizations, 6 casings)", [HFBadWords()])]
    configs += [(f"decodekit {m}", [BannedWords(words=banned_words, case_sensitive=False, mode=m)]) for m in ("mask", "rollback", "hybrid")]
    print(f"\n### Leak rate ({len(prompts)} prompts eliciting {banned_words}, greedy, {n_tokens} tokens, case-insensitive check)\n\n| strategy | outputs containing a banned word |\n|---|---|")
    for label, procs in configs:
        res = decodekit.generate(model, tok, prompts, decodekit.Strategy(processors=procs), max_new_tokens=n_tokens, chat=True)
        print(f"| {label} | {leaked(res.texts)} / {len(prompts)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--tokenizers", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--leak-words", nargs="+", default=["elephant", "banana"])
    ap.add_argument("--skip", nargs="*", default=[], help="build step generate")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription on a busy box)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    toks = {n: load_tok(n) for n in a.tokenizers}
    if "build" not in a.skip:
        bench_build(toks, a.sizes)
    if "step" not in a.skip:
        bench_step(toks, 1000, a.batches, a.steps, a.device)
    if "generate" not in a.skip:
        bench_generate(a.device, a.dtype, a.gen_tokens, a.leak_words)


if __name__ == "__main__":
    main()
