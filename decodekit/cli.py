"""The ``decodekit`` command line: ``generate``, ``plugins`` and whatever plugins register."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from decodekit.errors import DecodekitError, PluginError


def _generate(args: argparse.Namespace) -> int:
    from decodekit.api import generate, stream
    from decodekit.models import load_model
    from decodekit.strategy import Strategy

    strategy = Strategy.from_file(args.strategy) if args.strategy else None
    if strategy is not None:
        strategy.resolved()  # unknown components fail here, before the model loads
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, chat=args.chat, stop=args.stop or None)
    if args.json:
        result = generate(model, tok, args.prompt, strategy, **kwargs)
        print(json.dumps({"text": result.texts[0], "token_ids": result.token_ids[0], "stats": result.stats}))
        return 0
    for delta in stream(model, tok, args.prompt, strategy, **kwargs):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from decodekit.plugins import get_plugin_manager

    infos = get_plugin_manager().plugins()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    rows = [("name", "distribution", "version", "hooks", "components")]
    for i in infos:
        rows.append((i.name, i.distribution or "-", i.version or "-", ", ".join(h.removeprefix("decodekit_") for h in i.hooks), ", ".join(i.components)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from decodekit.plugins import get_plugin_manager

    parser = argparse.ArgumentParser(prog="decodekit", description="Plugin-based decoding strategies for causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="local HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--strategy", default=None, help="a JSON strategy file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the chat template (default: on)")
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    g.add_argument("--device", default=None, help="cpu, cuda, auto")
    g.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')
    g.set_defaults(func=_generate)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plugins)

    get_plugin_manager().call("decodekit_register_commands", subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (DecodekitError, PluginError) as e:
        print(f"decodekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
