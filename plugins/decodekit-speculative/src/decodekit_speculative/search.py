"""``decodekit search-skip MODEL``: find SelfSpeculative's skip set by Bayesian optimisation.

Draft & Verify (arXiv 2309.08168, Sec. 3.1) searches 2L binary variables (skip the attention / the
MLP of each layer) with Bayesian optimisation, the objective being measured speed. Here the
optimiser is optuna (TPE by default, its Gaussian-process sampler with ``--sampler gp``): a
maintained library, not a hand-written Gaussian process. The objective is tokens/s of greedy
generation with :class:`SelfSpeculative` on a few prompts (the output is identical to plain greedy
by construction, so only speed is measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from decodekit.errors import DecodekitError

#: Default prompts: input-grounded (where drafting pays most) and open-ended ones.
DEFAULT_PROMPTS = [
    "Repeat the following text exactly: The quick brown fox jumps over the lazy dog. "
    "A journey of a thousand miles begins with a single step.",
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works in simple words.",
]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise DecodekitError(
            "decodekit search-skip needs optuna (an optional extra): pip install 'decodekit-speculative[search]' "
            "or pip install optuna"
        ) from None
    return optuna


def measure(model: Any, tokenizer: Any, prompts: list[str], drafter: Any, max_new_tokens: int, chat: bool) -> dict[str, float]:
    """Tokens/s of greedy generation over ``prompts`` (one at a time, batch 1) and acceptance."""
    import decodekit

    new = drafted = accepted = 0
    seconds = 0.0
    with torch.no_grad():
        for p in prompts:
            r = decodekit.generate(model, tokenizer, p, decodekit.Strategy(drafter=drafter), max_new_tokens=max_new_tokens, chat=chat)
            new += r.stats["new_tokens"]
            seconds += r.stats["seconds"]
            drafted += r.stats.get("drafted", 0)
            accepted += r.stats.get("accepted", 0)
    return {"tokens_per_s": new / seconds, "acceptance_rate": accepted / drafted if drafted else 0.0}


def search_skip(
    model: Any,
    tokenizer: Any,
    prompts: list[str] | None = None,
    *,
    trials: int = 30,
    k: int = 6,
    max_new_tokens: int = 48,
    max_skip_fraction: float = 0.5,
    sampler: str = "tpe",
    seed: int = 0,
    chat: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Search the skip set that maximises measured tokens/s; returns the JSON-able result."""
    from decodekit_speculative.self_speculative import SelfSpeculative, decoder_layers

    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prompts = prompts or DEFAULT_PROMPTS
    say = progress or (lambda s: None)
    L = len(decoder_layers(model))
    if trials < 1:
        raise DecodekitError(f"trials must be >= 1, got {trials}")
    measure(model, tokenizer, prompts[:1], None, 4, chat)  # warm-up (allocator, first-call costs)
    base = measure(model, tokenizer, prompts, None, max_new_tokens, chat)
    say(f"baseline (no drafter): {base['tokens_per_s']:.2f} tok/s over {len(prompts)} prompts")

    def skip_sets(trial: Any) -> tuple[list[int], list[int]]:
        attn = [i for i in range(L) if trial.suggest_categorical(f"attn_{i}", [0, 1])]
        mlp = [i for i in range(L) if trial.suggest_categorical(f"mlp_{i}", [0, 1])]
        return attn, mlp

    def objective(trial: Any) -> float:
        attn, mlp = skip_sets(trial)
        n = len(attn) + len(mlp)
        if n == 0 or n > max_skip_fraction * 2 * L:
            # nothing skipped drafts at full cost; too much skipped never agrees: not worth a run
            say(f"trial {trial.number + 1}/{trials}: {n} sublayers skipped, outside 1..{int(max_skip_fraction * 2 * L)}: pruned")
            return 0.0
        r = measure(model, tokenizer, prompts, SelfSpeculative(skip_attention=attn, skip_mlp=mlp, k=k), max_new_tokens, chat)
        trial.set_user_attr("acceptance_rate", r["acceptance_rate"])
        best = max([r["tokens_per_s"]] + [t.value for t in trial.study.trials if t.value is not None])
        say(
            f"trial {trial.number + 1}/{trials}: skip attention {attn} mlp {mlp} -> {r['tokens_per_s']:.2f} tok/s "
            f"({r['tokens_per_s'] / base['tokens_per_s']:.2f}x, acceptance {r['acceptance_rate']:.2f}); best {best:.2f}"
        )
        return r["tokens_per_s"]

    if sampler == "tpe":
        opt = optuna.samplers.TPESampler(seed=seed)
    elif sampler == "gp":
        opt = optuna.samplers.GPSampler(seed=seed)
    else:
        raise DecodekitError(f"sampler must be 'tpe' or 'gp', got {sampler!r}")
    study = optuna.create_study(direction="maximize", sampler=opt)
    # Start where FACTS.md / Draft & Verify found agreement: a few middle attention sublayers.
    middle = range(L // 3, L // 3 + max(1, L // 8))
    study.enqueue_trial({**{f"attn_{i}": int(i in middle) for i in range(L)}, **{f"mlp_{i}": 0 for i in range(L)}})
    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    attn = [i for i in range(L) if best.params[f"attn_{i}"]]
    mlp = [i for i in range(L) if best.params[f"mlp_{i}"]]
    return {
        "skip_attention": attn,
        "skip_mlp": mlp,
        "k": k,
        "tokens_per_s": best.value,
        "baseline_tokens_per_s": base["tokens_per_s"],
        "speedup": best.value / base["tokens_per_s"],
        "acceptance_rate": best.user_attrs.get("acceptance_rate"),
        "layers": L,
        "trials": trials,
        "sampler": sampler,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
    }


def _command(args: argparse.Namespace) -> int:
    from decodekit.models import load_model

    _optuna()  # fail before loading the model
    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise DecodekitError(f"--prompts {path} does not exist; give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise DecodekitError(f"--prompts {path} holds no prompt; give one prompt per line")
    model, tok = load_model(None if args.model in ("default", "embedded") else args.model, dtype=args.dtype, device=args.device)
    result = search_skip(
        model, tok, prompts, trials=args.trials, k=args.k, max_new_tokens=args.max_new_tokens,
        max_skip_fraction=args.max_skip_fraction, sampler=args.sampler, seed=args.seed, chat=args.chat,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    result["model"] = args.model
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"best: skip attention {result['skip_attention']} mlp {result['skip_mlp']}: {result['tokens_per_s']:.2f} tok/s "
        f"({result['speedup']:.2f}x of plain greedy) -> {args.out}\n"
        f"use it: SelfSpeculative(skip_file={args.out!r}) or SelfSpeculative.from_file({args.out!r})"
    )
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("search-skip", help="find SelfSpeculative's skip set by Bayesian optimisation of tokens/s (needs optuna)")
    p.add_argument("model", help="local HF model dir, .gguf file, or 'default' for the embedded SmolLM2-135M-Instruct")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--k", type=int, default=6, help="most tokens drafted per step")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt per trial")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: 3 built-in prompts)")
    p.add_argument("--max-skip-fraction", type=float, default=0.5, help="most sublayers skipped, as a fraction of 2L")
    p.add_argument("--sampler", choices=["tpe", "gp"], default="tpe", help="optuna sampler: TPE or Gaussian process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="skip.json", help="where to write the result (JSON)")
    p.set_defaults(func=_command)
