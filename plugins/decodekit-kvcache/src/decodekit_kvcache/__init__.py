"""decodekit-kvcache: dynamic, static and sliding-window KV caches with O(1) rollback, a compiled
decode step for CUDA, and ``decodekit memory``.

Installing this distribution makes :class:`DynamicCache` the cache of every strategy that names
none; ``cache="NoCache"`` still selects the core's recompute-everything baseline.
"""

from __future__ import annotations

import decodekit

from decodekit_kvcache.caches import DynamicCache, SlidingWindowCache, StaticCache
from decodekit_kvcache.layout import Layout, kv_bytes, layout_from_config
from decodekit_kvcache.memory import estimate, memory_command

__all__ = ["DynamicCache", "Layout", "SlidingWindowCache", "StaticCache", "estimate", "kv_bytes", "layout_from_config"]


@decodekit.hookimpl
def decodekit_register_components(register):
    register(DynamicCache, default=True)
    register(StaticCache)
    register(SlidingWindowCache)


@decodekit.hookimpl
def decodekit_register_commands(subparsers):
    p = subparsers.add_parser(
        "memory",
        help="estimate weights + KV-cache bytes of a model (reads its config only)",
        description="Print weights + KV-cache bytes for a model, GQA- and sliding-window-aware, without loading weights.",
    )
    p.add_argument("model", help="local transformers model dir, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--max-len", type=int, default=None, help="slots per row in full layers (default: the model's context)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (default), float16")
    p.add_argument("--max-proposals", type=int, default=0, help="drafter proposals per step (sliding rings keep them)")
    p.add_argument("--max-rollback", type=int, default=0, help="extra rollback depth kept by sliding rings")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=memory_command)
