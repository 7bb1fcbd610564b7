"""decodekit-fsm benchmarks: build time/memory, per-step mask cost, generation overhead, leak rate.

    python benchmarks/fsm_bench.py --threads 1 --sizes 100 1000 10000 --tokenizers smollm2 gemma3
    python benchmarks/fsm_bench.py --device cuda --dtype bfloat16 --gen-tokens 256   # on a GPU box

Prints markdown tables, each headed by the load average (the CPU box is shared: compare figures as
ratios within one run). Word lists are synthetic (pronounceable 5-12 letter strings, seeded).

* build: ``BannedWords(...).engine_for(tokenizer)`` with the token bytes cached (as after the first
  use of a tokenizer). "cold" also recomputes the per-tokenizer texts (read back from the disk
  cache, as in a fresh process); "warm" reuses them (a second ban list in the same process).
  Times are taken without tracemalloc (it slows Python code several-fold); peak memory in a
  separate run under tracemalloc (includes the per-tokenizer texts).
* step: ``process_logits`` + ``accept`` per row (scores on ``--device``), median over a text that
  walks through many automaton states, with cold and warm mask caches; and the cost of one mask
  for a state never seen before.
* generate: tokens/s with 1,000 banned words vs none on the embedded model; the engine is built
  before the timed region (its masks cold), runs alternate and the median is reported.
* leak: prompts that try to elicit the words, for no ban, transformers ``bad_words_ids`` with the
  canonical tokenizations (6 casings / leading-space variants) and each decodekit mode.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import tracemalloc

import torch

import decodekit
from decodekit_fsm import BannedWords, automaton, token_bytes
from decodekit_fsm.banned import _ENGINES


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


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

    from decodekit.models import default_model_dir

    if name == "smollm2":
        return AutoTokenizer.from_pretrained(str(default_model_dir()))
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plugins", "decodekit-fsm", "tests"))
    from test_fsm_real_tokenizers import gemma_tok  # noqa: E402 (reuses the cached tokenizer)

    return gemma_tok()


def _forget(texts: bool) -> None:
    _ENGINES.clear()
    if texts:
        getattr(automaton, "_TEXTS", {}).clear()


def bench_build(toks: dict, sizes: list[int], repeats: int = 3) -> None:
    print(f"\n### Build time and memory ({load()})\n\n| tokenizer | vocab | words | cold s | warm s (median of {repeats}) "
          "| peak MB (tracemalloc, cold) | engine MB |\n|---|---|---|---|---|---|---|")
    for name, tok in toks.items():
        token_bytes(tok)  # cached per tokenizer once (disk + memory)
        for n in sizes:
            ws = words(n)
            _forget(texts=True)
            t0 = time.perf_counter()
            BannedWords(words=ws).engine_for(tok, len(tok))
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(repeats):
                _forget(texts=False)
                t0 = time.perf_counter()
                eng = BannedWords(words=ws).engine_for(tok, len(tok))
                warm.append(time.perf_counter() - t0)
            _forget(texts=True)
            tracemalloc.start()
            eng = BannedWords(words=ws).engine_for(tok, len(tok))
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            print(f"| {name} | {len(tok)} | {n} | {cold:.2f} | {statistics.median(warm):.2f} | {peak:.0f} | {eng.nbytes() / 2**20:.0f} |")


def _state(tok, B: int, device: str):
    from decodekit.state import DecodeState

    V = len(tok)
    st = DecodeState(model=None, tokenizer=tok, device=torch.device(device), batch_size=B, vocab_size=V, prompt_ids=[[0]] * B,
                     prompt_lengths=torch.ones(B, dtype=torch.long), seeds=torch.zeros(B, dtype=torch.long), max_new_tokens=10**6,
                     eos_token_ids=torch.tensor([], dtype=torch.long), pad_token_id=0)
    st.proposals = torch.zeros(B, 0, dtype=torch.long, device=device)
    st.finished = torch.zeros(B, dtype=torch.bool, device=device)
    return st


def bench_step(toks: dict, n_words: int, batches: list[int], steps: int, device: str) -> None:
    """Per-step processor cost on text that walks through many automaton states (cold: every state
    is new on its first visit; warm: the same text again)."""
    print(f"\n### Per-step cost ({n_words} words, device {device}; {load()})\n\n| tokenizer | batch | cold median µs/row "
          "| warm median µs/row | warm p90 µs/row | new-state mask median µs |\n|---|---|---|---|---|---|")
    for name, tok in toks.items():
        ws = words(n_words)
        rng = random.Random(1)
        text = " ".join(rng.choice(ws)[:-1] + " and some more text" for _ in range(40))
        ids = tok(text, add_special_tokens=False)["input_ids"][:steps]
        V = len(tok)
        # A mask for a state never seen before.
        _forget(texts=False)
        eng = BannedWords(words=ws).engine_for(tok, V)
        first = getattr(eng, "mask_ids", eng.mask_np)
        seen, fresh, sid = {eng.start}, [], eng.start
        for t in ids:
            sid = eng.advance(sid, t).sid
            if sid not in seen:
                seen.add(sid)
                t0 = time.perf_counter()
                first(sid)
                fresh.append((time.perf_counter() - t0) * 1e6)
        for B in batches:
            _forget(texts=False)
            bw = BannedWords(words=ws)
            st = _state(tok, B, device)
            bw.setup(st)
            scores = torch.randn(B, 1, V, device=device)
            step_tokens = [torch.full((B, 1), t, dtype=torch.long, device=device) for t in ids]
            st.accepted = torch.ones(B, dtype=torch.long, device=device)
            st.rolled_back = torch.zeros(B, dtype=torch.long, device=device)
            for label in ("cold", "warm"):
                bw.setup(st)
                times = []
                for tokens in step_tokens:
                    st.scores = scores
                    st.step_tokens = tokens  # what the loop would have committed (outside the timed part)
                    t0 = time.perf_counter()
                    bw.process_logits(st)
                    bw.accept(st)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) / B * 1e6)
                if label == "cold":
                    cold = statistics.median(times)
            warm = statistics.median(times)
            p90 = sorted(times)[int(0.9 * len(times))]
            print(f"| {name} | {B} | {cold:.0f} | {warm:.0f} | {p90:.0f} | {statistics.median(fresh):.0f} (n={len(fresh)}) |")


LEAK_PROMPTS = [
    "Repeat after me exactly: {w} {w} {w}.",
    "Spell the word {w} letter by letter, then write it in capitals.",
    "Write the plural of {w} and use {w} in a sentence.",
    "Write {w} with hyphens between the syllables.",
    "Write a Python variable named {w}_count and a function get_{w}().",
    "Say {W} three times in capital letters.",
]


def bench_generate(model, tok, device: str, dtype: str | None, n_tokens: int, repeats: int) -> None:
    ws = words(1000)
    prompt = "Tell me a short story about a cat and a dog."
    bw = BannedWords(words=ws)
    _forget(texts=False)
    t0 = time.perf_counter()
    decodekit.generate(model, tok, prompt, decodekit.Strategy(processors=[bw]), max_new_tokens=1, chat=True)  # builds the engine
    build = time.perf_counter() - t0
    eng = bw._engine
    runs: dict[str, list[float]] = {"no ban": [], "ban": []}
    texts = {}
    for _ in range(repeats):  # alternate, so both see the same load on average
        for label, procs in (("no ban", []), ("ban", [bw])):
            if procs:
                getattr(eng, "clear_caches", lambda: None)()  # cold masks: every state's mask is computed inside the timed run
            res = decodekit.generate(model, tok, prompt, decodekit.Strategy(processors=procs), max_new_tokens=n_tokens, chat=True)
            runs[label].append(res.stats["tokens_per_s"])
            texts[label] = res.texts[0]
    base = statistics.median(runs["no ban"])
    print(f"\n### Generation speed (SmolLM2-135M, {device}, {dtype or 'float32'}, {n_tokens} tokens, batch 1, median of "
          f"{repeats} alternating runs; {load()})\n\n| strategy | tok/s (median) | all runs | relative |\n|---|---|---|---|")
    for label, name in (("no ban", "no ban"), ("ban", "BannedWords 1,000 words (mask; engine built before, masks cold)")):
        med = statistics.median(runs[label])
        print(f"| {name} | {med:.2f} | {', '.join(f'{x:.2f}' for x in runs[label])} | {med / base:.3f} |")
    print(f"\n(engine build + 1-token generation outside the timed runs: {build:.2f} s; the texts "
          f"{'are identical' if texts['no ban'] == texts['ban'] else 'differ (the ban changed the output)'})")


def bench_leak(model, tok, n_tokens: int, banned_words: list[str]) -> None:
    prompts = [p.format(w=w, W=w.upper()) for w in banned_words for p in LEAK_PROMPTS]

    def leaked(texts):
        return sum(any(w in t.casefold() for w in banned_words) for t in texts)

    bad = []
    for w in banned_words:
        for v in (w, " " + w, w.capitalize(), " " + w.capitalize(), w.upper(), " " + w.upper()):
            bad.append(tok(v, add_special_tokens=False)["input_ids"])

    class HFBadWords(decodekit.Processor):
        """transformers' own NoBadWordsLogitsProcessor on the committed ids (batch 1 positions)."""

        def setup(self, state):
            from transformers import NoBadWordsLogitsProcessor

            self._p = NoBadWordsLogitsProcessor(bad, eos_token_id=tok.eos_token_id)

        def process_logits(self, state):
            return self._p(state.committed_ids(), state.scores[:, 0].clone())[:, None]

    configs = [("no ban", []), ("transformers bad_words_ids (canonical tokenizations, 6 casings)", [HFBadWords()])]
    configs += [(f"decodekit BannedWords mode={m}", [BannedWords(words=banned_words, case_sensitive=False, mode=m)])
                for m in ("mask", "rollback", "hybrid")]
    print(f"\n### Leak rate ({len(prompts)} prompts eliciting {banned_words}, greedy, {n_tokens} tokens, chat template; "
          f"an output leaks if its casefolded text contains a word; {load()})\n\n| strategy | outputs containing a banned word "
          "| by prompt: repeat / spell / plural / hyphens / code / capitals | example |\n|---|---|---|---|")
    T = len(LEAK_PROMPTS)
    for label, procs in configs:
        res = decodekit.generate(model, tok, prompts, decodekit.Strategy(processors=procs), max_new_tokens=n_tokens, chat=True)
        per = [leaked(res.texts[k::T]) for k in range(T)]  # prompts are word-major: template k at k, k+T, ...
        print(f"| {label} | {leaked(res.texts)} / {len(prompts)} | {' / '.join(map(str, per))} | {_excerpt(res.texts, banned_words)} |")


def _excerpt(texts: list[str], banned_words: list[str]) -> str:
    """Around the first leaked word (or the start of the first output when nothing leaked)."""
    for t in texts:
        t = " ".join(t.split())
        i = min((j for j in (t.casefold().find(w) for w in banned_words) if j >= 0), default=-1)
        if i >= 0:
            return ("…" if i > 30 else "") + t[max(0, i - 30):i + 40].replace("|", "\\|") + "…"
    return " ".join(texts[0].split())[:70].replace("|", "\\|") + "…"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--tokenizers", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per configuration (generation speed)")
    ap.add_argument("--leak-words", nargs="+", default=["elephant", "banana"])
    ap.add_argument("--skip", nargs="*", default=[], help="any of: build step generate leak")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription on a busy box)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    toks = {n: load_tok(n) for n in a.tokenizers} if {"build", "step"} - set(a.skip) else {}
    if "build" not in a.skip:
        bench_build(toks, a.sizes)
    if "step" not in a.skip:
        bench_step(toks, 1000, a.batches, a.steps, a.device)
    if {"generate", "leak"} - set(a.skip):
        model, tok = decodekit.load_model(dtype=a.dtype, device=a.device)
        if "generate" not in a.skip:
            bench_generate(model, tok, a.device, a.dtype, a.gen_tokens, a.repeats)
        if "leak" not in a.skip:
            bench_leak(model, tok, a.gen_tokens, a.leak_words)


if __name__ == "__main__":
    main()
