"""``decodekit memory``: weights + KV-cache bytes from a model's config, no weights loaded.

Parameters are counted on the ``meta`` device (shapes only, no memory); the KV part uses the
same :func:`~decodekit_kvcache.layout.kv_bytes` the caches allocate by, so the estimate equals a
:class:`~decodekit_kvcache.StaticCache`'s allocation to the byte.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from decodekit.errors import DecodekitError

from decodekit_kvcache.layout import kv_bytes, layout_from_config, text_config

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def load_config(model: str) -> Any:
    """A transformers config for ``model`` ('default', a local dir or a .gguf), reading metadata only."""
    from transformers import AutoConfig

    if model == "default":
        from decodekit import models

        converted = models.cache_dir() / f"smollm2-135m-instruct-{models.DEFAULT_SHA256[:12]}"
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(str(converted))
        model = str(models.default_gguf())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DecodekitError(f"GGUF file {path} does not exist")
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        cfg = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if not (path / "config.json").is_file():
        raise DecodekitError(f"{model!r} is not a local model dir (no config.json), a .gguf file, nor 'default'")
    return AutoConfig.from_pretrained(str(path))


def count_parameters(config: Any) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (tied weights once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate(config: Any, *, batch: int = 1, max_len: int | None = None, dtype: str = "bfloat16",
             max_proposals: int = 0, max_rollback: int = 0) -> dict[str, Any]:
    """Weights and KV bytes for ``batch`` rows of ``max_len`` slots (a StaticCache's allocation)."""
    if dtype not in DTYPE_BYTES:
        raise DecodekitError(f"--dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    for name, v, low in (("batch", batch, 1), ("max_proposals", max_proposals, 0), ("max_rollback", max_rollback, 0)):
        if v < low:
            raise DecodekitError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    cfg = text_config(config)
    layout = layout_from_config(config)
    L = max_len or getattr(cfg, "max_position_embeddings", None)
    if not L or L < 1:
        raise DecodekitError(f"--max-len must be >= 1 (the config gives no max_position_embeddings), got {max_len!r}")
    size = DTYPE_BYTES[dtype]
    params = count_parameters(config)
    kv = kv_bytes(layout, batch, L, max_proposals + max_rollback, size)
    heads = int(cfg.num_attention_heads)
    naive = len(layout.kinds) * 2 * batch * heads * layout.head_dim * size * L  # repeated heads, no rings
    return {
        "layers": len(layout.kinds), "full_layers": layout.n_full, "sliding_layers": layout.n_sliding,
        "window": layout.window, "kv_heads": layout.kv_heads, "query_heads": heads, "head_dim": layout.head_dim,
        "batch": batch, "max_len": L, "dtype": dtype, "parameters": params, "weights_bytes": params * size,
        "kv_full_bytes": kv["full"], "kv_sliding_bytes": kv["sliding"], "kv_bytes": kv["total"],
        "kv_bytes_naive": naive, "total_bytes": params * size + kv["total"],
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def memory_command(args: argparse.Namespace) -> int:
    e = estimate(load_config(args.model), batch=args.batch, max_len=args.max_len, dtype=args.dtype,
                 max_proposals=args.max_proposals, max_rollback=args.max_rollback)
    if args.json:
        print(json.dumps(e))
        return 0
    ring = f", sliding window {e['window']}" if e["window"] else ""
    print(f"{args.model}: {e['layers']} layers ({e['full_layers']} full, {e['sliding_layers']} sliding{ring}), "
          f"{e['query_heads']} query / {e['kv_heads']} KV heads x {e['head_dim']}, {e['parameters']:,} parameters")
    print(f"batch {e['batch']}, max_len {e['max_len']}, {e['dtype']}\n")
    rows = [("weights", e["weights_bytes"]), ("KV full layers", e["kv_full_bytes"]),
            ("KV sliding layers (rings)", e["kv_sliding_bytes"]), ("total", e["total_bytes"])]
    print("| part | bytes | size |\n|---|---:|---:|")
    for name, n in rows:
        print(f"| {name} | {n:,} | {_human(n)} |")
    print(f"\nKV without GQA/sliding awareness would be {_human(e['kv_bytes_naive'])}.")
    return 0
