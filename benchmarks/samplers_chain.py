"""Cost of the sampling chain: repetition penalty -> temperature -> top-k -> top-p -> min-p ->
multinomial, per step and in generation, against plain greedy.

    python benchmarks/samplers_chain.py                                   # CPU, fp32, [1, 49152]
    python benchmarks/samplers_chain.py --device cuda --dtype bfloat16 --batch 64
    python benchmarks/samplers_chain.py --compile --skip-generate                # CPU, compiled chain too

Prints markdown tables. Part 1 times one step of the chain on random logits [B, V] (decodekit's
processors eager, and on CUDA (or with --compile) compiled as one graph, vs transformers'
LogitsProcessorList + torch.multinomial); part 2 generates with the
embedded SmolLM2-135M (greedy vs the chain; the installed default cache, or --cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decodekit
import decodekit_samplers as S
from decodekit.state import DecodeState


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def chain(B: int = 1) -> list:
    return [S.RepetitionPenalty(1.1), S.Temperature(0.7), S.TopK(40), S.TopP(0.9), S.MinP(0.05)]


def fake_state(B: int, V: int, history: int, device: torch.device) -> DecodeState:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (B, history), generator=g).tolist()
    st = DecodeState(model=None, tokenizer=None, device=device, batch_size=B, vocab_size=V, prompt_ids=prompts,
                     prompt_lengths=torch.full((B,), history, device=device), seeds=torch.arange(B, device=device),
                     max_new_tokens=256, eos_token_ids=torch.tensor([], device=device), pad_token_id=0)
    st.committed = torch.full((B,), history, device=device)
    st.n_new = torch.zeros(B, dtype=torch.long, device=device)
    st.proposals = torch.zeros(B, 0, dtype=torch.long, device=device)
    return st


def bench_step(B: int, V: int, dtype: torch.dtype, device: torch.device, repeat: int, compiled: bool) -> list[tuple[str, float]]:
    from transformers.generation import logits_process as hf

    logits = (torch.randn(B, V, device=device) * 3).to(dtype)
    state = fake_state(B, V, 512, device)
    procs = chain(B)
    for p in procs:
        p.setup(state)
    sampler = S.Multinomial()

    def chain_step(x: torch.Tensor) -> torch.Tensor:
        state.scores = x[:, None].float()  # the loop hands processors float32 scores
        for p in procs:
            state.scores = p.process_logits(state)
        return sampler.sample(state)[0]

    def ours() -> torch.Tensor:
        return chain_step(logits)

    ids = torch.tensor(state.prompt_ids, device=device)
    hf_chain = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.1), hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(40),
        hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.05),
    ])

    def theirs() -> torch.Tensor:
        scores = hf_chain(ids, logits.float())
        return torch.multinomial(scores.softmax(-1), 1)

    def greedy() -> torch.Tensor:
        return logits.float().argmax(-1)

    rows = [
        ("greedy argmax", timed(greedy, device, repeat)),
        ("decodekit chain + Multinomial", timed(ours, device, repeat)),
    ]
    if compiled:
        # The chain as StaticCache runs it inside the decode step: one torch.compile graph, on
        # CUDA replayed as a CUDA graph ("reduce-overhead"), so ~40 eager launches become one replay.
        mode = "reduce-overhead" if device.type == "cuda" else None
        step = torch.compile(chain_step, fullgraph=True, dynamic=False, mode=mode)

        def ours_compiled() -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay are dead
            return step(logits)

        t0 = time.perf_counter()
        first = ours_compiled()
        sync(device)
        print(f"(compiled chain: first call {time.perf_counter() - t0:.1f} s; same tokens as eager: "
              f"{torch.equal(first, ours())})")
        rows.append((f"decodekit chain + Multinomial, torch.compile({mode or 'default'})", timed(ours_compiled, device, repeat)))
    rows.append(("transformers LogitsProcessorList + torch.multinomial", timed(theirs, device, repeat)))
    return rows


def bench_generate(args, device: torch.device) -> list[tuple[str, float, float]]:
    model, tok = decodekit.load_model(dtype=args.dtype, device=str(device))
    cache = args.cache
    prompts = ["Write a short story about a robot learning to paint."] * args.gen_batch
    rows = []
    for name, strategy in [
        ("greedy", decodekit.Strategy(cache=cache)),
        ("chain + Multinomial", decodekit.Strategy(cache=cache, processors=chain(args.gen_batch), sampler="Multinomial")),
    ]:
        decodekit.generate(model, tok, prompts, strategy, max_new_tokens=4, seed=0, chat=True)  # warm-up
        res = decodekit.generate(model, tok, prompts, strategy, max_new_tokens=args.new_tokens, seed=0, chat=True)
        st = res.stats
        rows.append((name, st["tokens_per_s"], 1e3 * st["seconds"] / max(1, st["steps"])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1, help="rows of the per-step benchmark")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--gen-batch", type=int, default=1, help="prompts in the generation benchmark")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cache", default=None, help="cache component, e.g. StaticCache (default: the installed default)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the chain compiled as one graph (default: on CUDA only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives stable figures on a shared box)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"\n### One sampling step, logits [{args.batch}, {args.vocab}] {args.dtype} on {device} (median of {args.repeat})\n")
    print("| what | ms / step |\n|---|---:|")
    compiled = device.type == "cuda" if args.compile is None else args.compile
    for name, ms in bench_step(args.batch, args.vocab, dtype, device, args.repeat, compiled):
        print(f"| {name} | {ms:.3f} |")

    if not args.skip_generate:
        print(f"\n### Generation, SmolLM2-135M-Instruct {args.dtype} on {device}, batch {args.gen_batch}, "
              f"{args.new_tokens} new tokens, cache {args.cache or 'default'}\n")
        print("| strategy | tokens/s | ms / step |\n|---|---:|---:|")
        rows = bench_generate(args, device)
        for name, tps, ms in rows:
            print(f"| {name} | {tps:.1f} | {ms:.2f} |")
        print(f"\nchain / greedy tokens/s: {rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
