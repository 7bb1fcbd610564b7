"""Where the sampling chain's cost goes in generation: GPU kernels, host time, each processor.

The chain of issue #4, repetition penalty -> temperature -> top-k -> top-p -> min-p -> Multinomial,
against plain greedy, both through ``decodekit`` with ``StaticCache`` (on CUDA the decode step is
compiled with ``torch.compile(mode="reduce-overhead")``: forward + processors + sampler are one CUDA
graph; ``accept`` hooks, the commit and the stop check run eagerly on the host). Prints:

(a) kernels: GPU kernel time per decode step (sum over every kernel the profiler saw, divided by
    the steps profiled; prefill excluded) and the top kernels by total time, greedy vs chain;
(b) host: wall time per step and the host time inside each part of the loop (the compiled step
    call, the commit, the accept hooks, the stop check, which includes waiting for the GPU);
(c) each processor alone on ``[1, V]`` and ``[64, V]`` logits (bf16 values upcast to float32, as the
    loop hands them to processors), eager and compiled, timed with CUDA events;
(d) with ``--ablate``: ms per token in generation for greedy, Multinomial alone and every prefix of
    the chain, so each processor's marginal cost inside the real compiled step shows.

    python benchmarks/samplers_profile_gpu.py                        # CUDA, bf16, SmolLM2-135M shapes
    python benchmarks/samplers_profile_gpu.py --steps 64 --top 15
    python benchmarks/samplers_profile_gpu.py --ablate               # + (d) ms / token of each chain prefix
    python benchmarks/samplers_profile_gpu.py --device cpu --tiny    # CPU smoke check (eager, seconds)

SmolLM2-135M's architecture with random weights (benchmarks/configs/smollm2-135m.json): speed
depends on shapes, not on weight values. ``stop_at_eos=False``, so every step is a full step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT), str(ROOT / "plugins" / "decodekit-kvcache" / "src"),
                str(ROOT / "plugins" / "decodekit-samplers" / "src")]

import decodekit  # noqa: E402
import decodekit.loop as loop  # noqa: E402
import decodekit_samplers as S  # noqa: E402
from decodekit.state import DecodeState  # noqa: E402
from decodekit_kvcache import StaticCache  # noqa: E402
from samplers_gpu import SENTENCES, build, chain  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- host timers
class HostTimers:
    """Wall time spent inside the loop's parts, patched in for the profiled steps only."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def _wrap(self, owner, name: str, label) -> None:
        orig = getattr(owner, name)
        total = self.total

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                total[label(a) if callable(label) else label] += time.perf_counter() - t0

        setattr(owner, name, timed)
        self._undo.append((owner, name, orig))

    def __enter__(self) -> "HostTimers":
        def hook_kind(a) -> str:  # _call(fns, state): accept hooks or cache_update
            fns = a[0]
            return "accept hooks" if fns and fns[0][0].endswith(".accept") else "cache_update"

        self._wrap(StaticCache, "step", "cache.step (compiled call)")
        for name in ("_commit", "_commit_plain"):  # the plain-decoding commit exists in newer loops
            if hasattr(loop, name):
                self._wrap(loop, name, "commit")
        self._wrap(loop, "_call", hook_kind)
        self._wrap(loop._StopCheck, "all_finished", "stop check (waits for the GPU)")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)


# ----------------------------------------------------------------------------- (a) + (b)
def profile_generation(model, tok, procs, sampler: str, args, device: torch.device, compiled: bool) -> dict:
    """Warm up (compile), then run ``args.steps`` decode steps under the profiler and the timers."""
    strategy = decodekit.Strategy(cache=StaticCache(compile=compiled), processors=procs, sampler=sampler,
                                  stop_at_eos=False)
    prompts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    N = args.warmup_steps + args.steps + 2
    decodekit.generate(model, tok, prompts, strategy, max_new_tokens=N, seed=0)  # compile + capture
    state, strategy = loop.prepare(model, tok, prompts, strategy, max_new_tokens=N, seed=0)
    steps = loop.run(state, strategy)
    for _ in range(1 + args.warmup_steps):  # the prefill, then steady-state steps
        next(steps)
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof, HostTimers() as timers:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(steps)
        sync(device)
        wall = time.perf_counter() - t0
    steps.close()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.time_range.elapsed_us()  # a kernel, memcpy or memset: its span on the GPU
        else:
            # CPU proxy: self time of every aten op (a CPU "kernel")
            if not ev.name.startswith("aten::"):
                continue
            us = ev.self_cpu_time_total
        kernels[ev.name][0] += us
        kernels[ev.name][1] += 1
    return {"wall": wall, "host": dict(timers.total), "kernels": dict(kernels), "steps": args.steps,
            "fallback": (state.extras.get("stats") or {}).get("compile_fallback")}


def short(name: str, n: int = 90) -> str:
    name = " ".join(name.split())
    return name if len(name) <= n else name[: n - 3] + "..."


def print_generation(res: dict[str, dict], top: int, device: torch.device) -> None:
    unit = "GPU kernel" if device.type == "cuda" else "CPU op (self time; proxy for kernels)"
    print(f"\n### (a) {unit} time per decode step\n")
    print("| strategy | ms / step, wall | kernel ms / step (sum) | kernel launches / step |")
    print("|---|---:|---:|---:|")
    for what, r in res.items():
        k = r["kernels"]
        print(f"| {what} | {1e3 * r['wall'] / r['steps']:.3f} | {sum(v[0] for v in k.values()) / 1e3 / r['steps']:.3f} | "
              f"{sum(v[1] for v in k.values()) / r['steps']:.1f} |")
    launches = {w: sum(v[1] for v in r["kernels"].values()) / r["steps"] for w, r in res.items()}
    if device.type == "cuda" and min(launches.values()) < 20:
        print("\n(few kernels per step: this CUPTI does not itemise kernels inside CUDA graph replays; "
              "the wall and host figures still hold)")
    for what, r in res.items():
        print(f"\n**{what}**: top {top} by total time (per step)\n")
        print("| kernel | us / step | calls / step |\n|---|---:|---:|")
        for name, (us, n) in sorted(r["kernels"].items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"| `{short(name)}` | {us / r['steps']:.1f} | {n / r['steps']:.1f} |")
    if len(res) == 2:
        (ga, g), (ca, c) = res.items()
        extra = {n: (v[0] - g["kernels"].get(n, [0.0, 0])[0] * c["steps"] / g["steps"], v[1]) for n, v in c["kernels"].items()}
        print(f"\n**kernels only in {ca}, or longer there** (per step, vs {ga})\n")
        print("| kernel | extra us / step | calls / step |\n|---|---:|---:|")
        for name, (us, n) in sorted(extra.items(), key=lambda kv: -kv[1][0])[:top]:
            if us > 0.05 * c["steps"]:
                print(f"| `{short(name)}` | {us / c['steps']:.1f} | {n / c['steps']:.1f} |")

    print("\n### (b) host time per decode step (ms; wall includes waiting for the GPU)\n")
    parts = sorted({p for r in res.values() for p in r["host"]})
    print("| strategy | wall | " + " | ".join(parts) + " | rest of the loop |")
    print("|---|---:|" + "---:|" * (len(parts) + 1))
    for what, r in res.items():
        ms = {p: 1e3 * r["host"].get(p, 0.0) / r["steps"] for p in parts}
        wall = 1e3 * r["wall"] / r["steps"]
        print(f"| {what} | {wall:.3f} | " + " | ".join(f"{ms[p]:.3f}" for p in parts) + f" | {wall - sum(ms.values()):.3f} |")


# ----------------------------------------------------------------------------- (c)
def fake_state(B: int, V: int, history: int, device: torch.device) -> DecodeState:
    """A mid-generation state: a ``history``-token prompt, 64 new tokens committed."""
    g = torch.Generator().manual_seed(0)
    st = DecodeState(model=None, tokenizer=None, device=device, batch_size=B, vocab_size=V,
                     prompt_ids=torch.randint(0, V, (B, history), generator=g).tolist(),
                     prompt_lengths=torch.full((B,), history, device=device), seeds=torch.arange(B, device=device),
                     max_new_tokens=256, eos_token_ids=torch.tensor([], dtype=torch.long, device=device), pad_token_id=0)
    st.committed = torch.full((B,), history + 64, device=device)
    st.n_new = torch.full((B,), 64, dtype=torch.long, device=device)
    st.out_tokens = torch.randint(0, V, (B, 257), generator=g).to(device)
    st.proposals = torch.zeros(B, 0, dtype=torch.long, device=device)
    st.finished = torch.zeros(B, dtype=torch.bool, device=device)
    return st


def time_fn(fn, device: torch.device, repeat: int) -> float:
    """Median microseconds of fn(): CUDA events on CUDA, perf_counter on CPU."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(1e3 * a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def kernel_time(fn, device: torch.device, calls: int) -> float:
    """GPU kernel microseconds per call of fn (sum over the kernels the profiler saw)."""
    sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    return sum(ev.time_range.elapsed_us() for ev in prof.events() if ev.device_type != torch.autograd.DeviceType.CPU) / calls


def bench_processors(args, device: torch.device, backend: str | None) -> list[tuple]:
    rows = []
    V = args.vocab
    for B in [int(b) for b in args.proc_batch.split(",")]:
        state = fake_state(B, V, 512, device)
        logits = (torch.randn(B, 1, V, device=device) * 4).to(torch.bfloat16).float()
        items = [(type(p).__name__, p) for p in chain()] + [("Multinomial (sampler)", S.Multinomial())]
        for name, comp in items:
            comp.setup(state)
            if name.startswith("Multinomial"):
                def one(x, comp=comp):
                    state.scores = x
                    return comp.sample(state)[0]
            else:
                def one(x, comp=comp):
                    state.scores = x
                    return comp.process_logits(state)
            eager = time_fn(lambda: one(logits), device, args.repeat)
            comp_us = kern_us = None
            if backend is not None:
                mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
                # Every `one` shares a code object: without a reset the 9th compile would hit
                # dynamo's recompile limit and silently run eagerly.
                torch._dynamo.reset()
                fn = torch.compile(one, backend=backend, mode=mode, fullgraph=True, dynamic=False)

                def run_compiled(fn=fn):
                    torch.compiler.cudagraph_mark_step_begin()
                    return fn(logits)

                comp_us = time_fn(run_compiled, device, args.repeat)
                if device.type == "cuda":
                    # What the processor adds inside a CUDA graph is its kernels' GPU time; the
                    # event timing above also holds the host's launch of each replay.
                    kern_us = kernel_time(run_compiled, device, 20)
            rows.append((name, B, eager, comp_us, kern_us))
            print(f"  {name} [{B}, {V}]: eager {eager:.1f} us, compiled {'-' if comp_us is None else f'{comp_us:.1f} us'}"
                  f"{'' if kern_us is None else f' (kernels {kern_us:.1f} us)'}", flush=True)
    return rows


# ----------------------------------------------------------------------------- (d)
def ablate(model, tok, args, device: torch.device, compiled: bool) -> list[tuple[str, float]]:
    """ms per generated token for greedy, Multinomial alone, and each prefix of the chain: the
    marginal cost of every processor inside the real step (one compile per prefix)."""
    prompts = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    names = [type(p).__name__ for p in chain()]
    cases = [("greedy", 0, "Greedy")] + [(" + ".join(names[:i] + ["Multinomial"]), i, "Multinomial") for i in range(len(names) + 1)]
    rows = []
    for label, i, sampler in cases:
        strategy = decodekit.Strategy(cache=StaticCache(compile=compiled), processors=chain()[:i], sampler=sampler,
                                      stop_at_eos=False)
        N = args.ablate_tokens
        decodekit.generate(model, tok, prompts, strategy, max_new_tokens=N, seed=0)  # compile + capture
        times = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            decodekit.generate(model, tok, prompts, strategy, max_new_tokens=N, seed=0)
            sync(device)
            times.append(time.perf_counter() - t0)
        rows.append((label, 1e3 * statistics.median(times) / N))
        print(f"  {label}: {rows[-1][1]:.3f} ms / token", flush=True)
    return rows


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "smollm2-135m.json"))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama with a 49,152 vocabulary (CPU smoke check)")
    ap.add_argument("--real", action="store_true", help="the embedded SmolLM2-135M-Instruct instead of random weights")
    ap.add_argument("--batch", type=int, default=1, help="rows in the generation profile")
    ap.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    ap.add_argument("--warmup-steps", type=int, default=8, help="decode steps run before profiling")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per strategy")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary of the per-processor timings (c)")
    ap.add_argument("--proc-batch", default=None, help="rows for (c), comma-separated (default 1,64 on CUDA, 1 on CPU)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per processor in (c) (default 200 CUDA, 10 CPU)")
    ap.add_argument("--compile-backend", default=None,
                    help="compile the step and (c)'s processors with this backend; default inductor on CUDA, none on CPU")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--ablate", action="store_true",
                    help="(d): ms / token of each prefix of the chain in generation (one compile each: minutes on a GPU)")
    ap.add_argument("--ablate-tokens", type=int, default=128)
    ap.add_argument("--skip-processors", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    backend = args.compile_backend or ("inductor" if cuda else None)
    args.proc_batch = args.proc_batch or ("1,64" if cuda else "1")
    args.repeat = args.repeat or (200 if cuda else 10)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.dtype}")

    if not args.skip_generate:
        if not cuda and args.steps == 32:
            args.steps, args.warmup_steps = 8, 2  # a smoke check on CPU
        model, tok, label = build(args)
        compiled = backend is not None
        if compiled and backend != "inductor":
            print("(generation: StaticCache compiles with inductor only; --compile-backend applies to (c))")
        print(f"generation: {label}, batch {args.batch}, StaticCache {'compiled' if compiled else 'eager'}, "
              f"{args.steps} decode steps profiled after {args.warmup_steps}\n")
        res = {}
        for what, procs, sampler in [("greedy", [], "Greedy"), ("chain + Multinomial", chain(), "Multinomial")]:
            r = profile_generation(model, tok, procs, sampler, args, device, compiled)
            if r["fallback"]:
                print(f"  WARNING {what}: the compiled step fell back to eager: {r['fallback'][:200]}")
            res[what] = r
            print(f"  {what}: {1e3 * r['wall'] / r['steps']:.3f} ms / step", flush=True)
        g, c = (res[k]["wall"] / res[k]["steps"] for k in res)
        print(f"\nchain / greedy tokens/s: **{g / c:.3f}**")
        print_generation(res, args.top, device)

    if args.ablate:
        model, tok, label = build(args)
        compiled = backend is not None
        print(f"\n### (d) each prefix of the chain in generation ({label}, batch {args.batch}, "
              f"{args.ablate_tokens} new tokens, median of 3, StaticCache {'compiled' if compiled else 'eager'})\n")
        rows = ablate(model, tok, args, device, compiled)
        base = rows[0][1]
        print("\n| strategy | ms / token | vs greedy tok/s | added by the last processor, ms |\n|---|---:|---:|---:|")
        prev = None
        for label, ms in rows:
            print(f"| {label} | {ms:.3f} | {base / ms:.3f} | {'' if prev is None else f'{ms - prev:+.3f}'} |")
            prev = ms if label != "greedy" else None

    if not args.skip_processors:
        print(f"\n### (c) each processor alone, logits [B, {args.vocab}] (bf16 values as float32), "
              f"median of {args.repeat} ({'CUDA events' if cuda else 'perf_counter'})\n")
        rows = bench_processors(args, device, backend)
        mode = f"compiled ({backend}{', reduce-overhead' if cuda and backend == 'inductor' else ''})"
        print(f"\n| processor | B | eager us | {mode} us | compiled: GPU kernel us |\n|---|---:|---:|---:|---:|")
        for proc, B, eager, comp, kern in rows:
            print(f"| {proc} | {B} | {eager:.1f} | {'-' if comp is None else f'{comp:.1f}'} | {'-' if kern is None else f'{kern:.1f}'} |")


if __name__ == "__main__":
    main()
