"""The compiled step skips dynamo's guards on the model's nn.Module attributes (most of a compiled
call's host overhead), which is sound only if each model object has its own compiled step. Two
models of identical shapes that differ in a constant the compiled graph bakes in (RMSNorm's eps, a
module attribute, not a tensor) must each decode exactly like transformers; with
``module_guards=True`` an in-place edit of such a constant between generations is seen too."""

import pytest
import torch

import decodekit
from decodekit import Strategy
from decodekit.testing import hf_greedy, tiny_model
from decodekit_kvcache import StaticCache

PROMPTS = ["the cat and the dog", "on and on"]
N = 10


def compiled(**kw):
    return Strategy(cache=StaticCache(compile=True, compile_backend="eager", **kw), stop_at_eos=False)


def test_models_of_equal_shapes_get_their_own_step(tok):
    a = tiny_model("llama", seed=3)
    b = tiny_model("llama", seed=3, rms_norm_eps=5.0)  # same weights and shapes, another baked constant
    want_a, want_b = hf_greedy(a, tok, PROMPTS, N), hf_greedy(b, tok, PROMPTS, N)
    assert want_a != want_b  # the constant matters, so a shared graph would be caught
    assert decodekit.generate(a, tok, PROMPTS, compiled(), max_new_tokens=N).token_ids == want_a
    assert decodekit.generate(b, tok, PROMPTS, compiled(), max_new_tokens=N).token_ids == want_b
    assert decodekit.generate(a, tok, PROMPTS, compiled(), max_new_tokens=N).token_ids == want_a


def test_module_guards_see_an_in_place_edit(tok):
    m = tiny_model("llama", seed=4)
    before = decodekit.generate(m, tok, PROMPTS, compiled(module_guards=True), max_new_tokens=N).token_ids
    assert before == hf_greedy(m, tok, PROMPTS, N)
    for mod in m.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 5.0
    want = hf_greedy(m, tok, PROMPTS, N)
    assert want != before
    assert decodekit.generate(m, tok, PROMPTS, compiled(module_guards=True), max_new_tokens=N).token_ids == want


def test_a_torch_without_guard_filters_still_compiles(tok, monkeypatch):
    """torch.compile raised on an unknown option before guard_filter_fn existed (< 2.8): the step is
    then compiled without it and stays exact."""
    import decodekit_kvcache.caches as caches

    real = torch.compile
    seen = []

    def old_torch_compile(fn, **kw):
        if "guard_filter_fn" in (kw.get("options") or {}):
            seen.append("refused")
            raise RuntimeError("Unexpected optimization option guard_filter_fn")
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", old_torch_compile)
    monkeypatch.setattr(caches, "_STEP_FNS", {})
    m = tiny_model("llama", seed=5)
    got = decodekit.generate(m, tok, PROMPTS, compiled(), max_new_tokens=N)
    assert seen and got.token_ids == hf_greedy(m, tok, PROMPTS, N)
    assert got.stats["compiled_steps"] == got.stats["forward_passes"] - 1
