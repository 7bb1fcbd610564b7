"""A compiler failure inside the compiled decode step falls back to the exact eager step."""

import warnings

import pytest
import torch

import decodekit
from decodekit import Strategy
from decodekit.testing import hf_greedy, tiny_model, tiny_tokenizer


@torch._dynamo.register_backend(name="dk_failing_backend")
def _failing_backend(gm, example_inputs):
    raise RuntimeError("codegen failed on purpose")


def test_compile_failure_falls_back_to_eager_and_stays_exact(monkeypatch):
    monkeypatch.setenv("DECODEKIT_PLUGINS", "kvcache")
    decodekit.reset_plugin_manager()
    # One thread for this test only: dynamo guards on the thread count, so leaving it changed
    # would make every later test's compiled steps recompile.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_fallback()
    finally:
        torch.set_num_threads(threads)


def _check_fallback():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["the cat sat on", "a"]
    s = Strategy(cache={"name": "StaticCache", "compile": True, "compile_backend": "dk_failing_backend"}, stop_at_eos=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = decodekit.generate(model, tok, prompts, s, max_new_tokens=12)
    assert out.token_ids == hf_greedy(model, tok, prompts, 12)
    assert "codegen failed on purpose" in out.stats["compile_fallback"]
    assert out.stats["compiled_steps"] == 0
    assert any("compiling the decode step failed" in str(x.message) for x in w)
