"""The memory estimate equals what the caches allocate, to the byte; bad sizes fail before compute."""

import json

import pytest
import torch

import decodekit
from decodekit.cli import main
from decodekit_kvcache import estimate
from decodekit_kvcache.memory import load_config


def _bytes_by_hand(cfg, batch, full_slots, ring_entries, size):
    """Independent arithmetic: K and V, un-repeated KV heads, full layers x slots + sliding x ring."""
    types = getattr(cfg, "layer_types", None) or (["sliding_attention"] * cfg.num_hidden_layers if getattr(cfg, "sliding_window", None) else ["full_attention"] * cfg.num_hidden_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per = 2 * batch * cfg.num_key_value_heads * head_dim * size
    return sum(per * (full_slots if t == "full_attention" else ring_entries) for t in types)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_static_allocation_equals_estimate_to_the_byte(models, tok, kv, arch):
    model = models[arch]
    cache = decodekit.get_plugin_manager().component("StaticCache")(max_len=40, max_rollback=1)
    strategy = decodekit.Strategy(cache=cache, drafter=kv.SelfDrafter(k=2), stop_at_eos=False)
    decodekit.generate(model, tok, ["hello there", "a"], strategy, max_new_tokens=6)
    allocated = sum(t.numel() * t.element_size() for t in cache._store.keys + cache._store.values)
    assert cache.allocated_bytes() == allocated > 0
    est = estimate(model.config, batch=2, max_len=40, dtype="float32", max_proposals=2, max_rollback=1)
    assert est["kv_bytes"] == allocated
    window = getattr(model.config, "sliding_window", None) if arch != "llama" else None
    assert allocated == _bytes_by_hand(model.config, 2, 40, (window or 0) + 2 + 1 + 1, 4)


def test_dynamic_allocation_grows_in_blocks(models, tok):
    model = models["llama"]
    cache = decodekit.get_plugin_manager().component("DynamicCache")(block=16)
    decodekit.generate(model, tok, "hello there", decodekit.Strategy(cache=cache, stop_at_eos=False), max_new_tokens=30)
    slots = cache._store.capacity
    assert slots >= 30 and slots % 16 == 0
    assert cache.allocated_bytes() == _bytes_by_hand(model.config, 1, slots, 0, 4)


def test_memory_command_reads_config_only(models, tmp_path, capsys):
    model = models["gemma3"]
    model.save_pretrained(tmp_path)
    assert main(["memory", str(tmp_path), "--batch", "3", "--max-len", "100", "--dtype", "float16", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in model.parameters())  # the real model's own count
    assert e["weights_bytes"] == params * 2
    assert e["kv_bytes"] == _bytes_by_hand(model.config, 3, 100, model.config.sliding_window + 1, 2)
    assert e["kv_bytes"] < e["kv_bytes_naive"]  # MQA + rings
    assert main(["memory", str(tmp_path), "--batch", "2"]) == 0
    table = capsys.readouterr().out
    assert "| weights |" in table and "| KV sliding layers (rings) |" in table
    assert main(["memory", str(tmp_path), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


@pytest.mark.real_model
def test_memory_default_model_config():
    cfg = load_config("default")
    e = estimate(cfg, batch=1, max_len=2048, dtype="bfloat16")
    assert e["kv_heads"] == 3 and e["layers"] == 30
    assert e["kv_bytes"] == 30 * 2 * 3 * 64 * 2 * 2048


def test_static_too_short_fails_before_any_compute(models, tok):
    model = models["llama"]
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        prompt_len = len(tok("hello there the")["input_ids"])
        with pytest.raises(decodekit.DecodekitError, match=f"max_len >= {prompt_len + 20}"):
            decodekit.generate(model, tok, "hello there the", decodekit.Strategy(cache={"name": "StaticCache", "max_len": 8}), max_new_tokens=20)
    finally:
        handle.remove()
    assert calls == []
