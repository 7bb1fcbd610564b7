"""What a model's KV cache looks like, read from its config alone, and what it costs in bytes.

The same numbers drive the allocation (:mod:`decodekit_kvcache.store`) and the estimate
(``decodekit memory``), so a test can hold them equal to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decodekit.errors import DecodekitError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Layout:
    """Per-layer attention kinds and KV shapes of a decoder.

    Keys and values are stored un-repeated: ``kv_heads`` heads (GQA/MQA), not the query heads.
    """

    kinds: tuple[str, ...]  # FULL or SLIDING, one per layer
    kv_heads: int
    head_dim: int
    window: int | None      # sliding window in positions: a query attends to keys with q - k < window

    # Read a few times per decode step: counted once here (the dataclass is frozen).
    n_full: int = field(init=False)
    n_sliding: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_full", sum(k == FULL for k in self.kinds))
        object.__setattr__(self, "n_sliding", sum(k == SLIDING for k in self.kinds))


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layout_from_config(config: Any) -> Layout:
    """Read the layout from a transformers config (``layer_types`` wins over ``sliding_window``:
    Qwen2 sets a window it does not use, Gemma3 mixes sliding and full layers)."""
    cfg = text_config(config)
    n = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        unknown = sorted(set(types) - {FULL, SLIDING})
        if unknown:
            raise DecodekitError(
                f"decodekit-kvcache handles full and sliding-window attention layers; this model's config has "
                f"layer_types {unknown}: use cache='NoCache' for it"
            )
        kinds = tuple(types[:n])
    else:
        kinds = (SLIDING if window else FULL,) * n
    if SLIDING not in kinds:
        window = None
    elif not window or window < 1:
        raise DecodekitError(f"the config has sliding layers but sliding_window={window!r}; it must be an integer >= 1")
    return Layout(kinds, kv_heads, head_dim, int(window) if window else None)


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def ring_entries(layout: Layout, depth: int) -> int:
    """Entries a sliding layer keeps per row: the window, plus ``depth`` (the deepest a step writes
    ahead of the last committed token: proposals, bucket padding and allowed rollback), plus one
    scratch entry where writes that must not land (padding) go."""
    return layout.window + depth + 1 if layout.window else 0


def kv_bytes(layout: Layout, batch: int, full_slots: int, depth: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes of the K and V buffers: full layers hold ``full_slots`` slots, sliding layers a ring."""
    per_entry = 2 * batch * layout.kv_heads * layout.head_dim * dtype_bytes  # K and V
    full = layout.n_full * full_slots * per_entry
    sliding = layout.n_sliding * ring_entries(layout, depth) * per_entry
    return {"full": full, "sliding": sliding, "total": full + sliding}
