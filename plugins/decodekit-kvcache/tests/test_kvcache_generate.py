"""decodekit greedy with every cache is token-identical to transformers' own generate (fp32)."""

import pytest
import torch

import decodekit
from decodekit.testing import tiny_model

PROMPTS = ["hello there the", "a", "the cat is on it and the dog"]  # different lengths: left padding
N = 20  # longer than the tiny models' sliding window of 8

CACHES = {
    "DynamicCache": lambda: "DynamicCache",
    "StaticCache": lambda: "StaticCache",
    "StaticCache(max_len=64)": lambda: {"name": "StaticCache", "max_len": 64},
    # the compiled decode step, traced by dynamo (backend 'eager': no codegen, fast on CPU)
    "StaticCache(compiled)": lambda: {"name": "StaticCache", "compile": True, "compile_backend": "eager"},
}


def _cut(ref, eos=2):
    return ref[: ref.index(eos) + 1] if eos in ref else ref


def test_plugin_is_installed_and_default():
    pm = decodekit.get_plugin_manager()
    assert {"DynamicCache", "StaticCache", "SlidingWindowCache"} <= set(pm.components)
    cache, *_ = decodekit.Strategy().resolved()
    assert type(cache).__name__ == "DynamicCache"
    assert type(decodekit.Strategy(cache="NoCache").resolved()[0]) is decodekit.NoCache  # the baseline stays


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_greedy_matches_transformers_generate(models, tok, kv, arch, cache):
    model = models[arch]
    ref = kv.hf_greedy(model, tok, PROMPTS, N)
    out = decodekit.generate(model, tok, PROMPTS, decodekit.Strategy(cache=CACHES[cache]()), max_new_tokens=N)
    assert out.token_ids == [_cut(r) for r in ref]
    if cache == "StaticCache(compiled)":
        assert out.stats["compiled_steps"] > 0


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_cache_matches_and_refuses_full_models(models, tok, kv, arch):
    ref = kv.hf_greedy(models[arch], tok, PROMPTS, N)
    out = decodekit.generate(models[arch], tok, PROMPTS, decodekit.Strategy(cache="SlidingWindowCache"), max_new_tokens=N)
    assert out.token_ids == [_cut(r) for r in ref]
    with pytest.raises(decodekit.DecodekitError, match="no sliding-window layers"):
        decodekit.generate(models["llama"], tok, "hi", decodekit.Strategy(cache="SlidingWindowCache"), max_new_tokens=2)


@pytest.mark.parametrize(
    "arch,cache",
    [(a, c) for a in ("llama", "mistral", "gemma3") for c in ("DynamicCache", "StaticCache")] + [("gemma3", "StaticCache(compiled)")],
)
def test_ragged_speculation_and_rollback_match_generate(models, tok, kv, arch, cache):
    """Ragged acceptance (holes), component rollbacks and (compiled) verify-length bucketing
    (k=3 pads to 4) leave greedy output exactly as transformers generates it."""
    model = models[arch]
    ref = kv.hf_greedy(model, tok, PROMPTS, N)
    c = CACHES[cache]()
    c = {"name": c} if isinstance(c, str) else dict(c)
    c["max_rollback"] = 2
    strategy = decodekit.Strategy(cache=c, drafter=kv.SelfDrafter(k=3), processors=[kv.Backtrack(every=4, depth=2)])
    out = decodekit.generate(model, tok, PROMPTS, strategy, max_new_tokens=N)
    assert out.token_ids == [_cut(r) for r in ref]


def test_eager_attention_masks(tok, kv):
    """The cache's own 4D masks also in transformers' eager (additive float) format."""
    model = tiny_model("gemma3", attn_implementation=None)
    model.config._attn_implementation = "eager"
    ref = kv.hf_greedy(model, tok, PROMPTS, 16)
    out = decodekit.generate(model, tok, PROMPTS, decodekit.Strategy(cache="StaticCache"), max_new_tokens=16)
    assert out.token_ids == [_cut(r) for r in ref]


@pytest.mark.real_model
def test_real_model_dynamic_cache_matches_generate():
    model, tok = decodekit.load_model()
    prompt = "The capital of France is"
    enc = tok(prompt, return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    out = decodekit.generate(model, tok, prompt, decodekit.Strategy(stop_at_eos=False), max_new_tokens=12)
    assert out.token_ids[0] == ref


@pytest.mark.parametrize("cache", ["DynamicCache", "StaticCache"])
def test_equal_length_batch_with_rows_finishing_at_different_steps(models, tok, kv, cache):
    """Equal-length prompts (no padding) take the unmasked one-query path; rows that finish early
    then hold holes while the others go on. Each row must still match transformers on its own."""
    model = models["llama"]
    prompts = ["the cat sat on", "a dog ran to", "the cat is on it"]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == 1
    refs = [kv.hf_greedy(model, tok, [p], N)[0] for p in prompts]  # each row alone: no batch at all
    eos = refs[0][4]  # a token row 0 emits at step 5: rows finish at different steps (or never)
    out = decodekit.generate(model, tok, prompts, decodekit.Strategy(cache=cache, eos_token_ids=[eos]), max_new_tokens=N)
    assert out.token_ids == [_cut(r, eos) for r in refs]
    assert len({len(t) for t in out.token_ids}) > 1, "the test needs rows of different lengths"


def test_each_batch_size_and_width_compiles_its_own_step(models, tok, kv, monkeypatch):
    """Dynamo stops compiling a code object after recompile_limit variants and silently runs it
    eagerly: with one shared step, a second batch size would be that second variant here."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    model = models["llama"]
    s = decodekit.Strategy(cache={"name": "StaticCache", "compile": True, "compile_backend": "eager"})
    for prompts in (PROMPTS[:1], PROMPTS[:2], PROMPTS[:1]):  # batch 1, 2, then 1 again: reused
        out = decodekit.generate(model, tok, prompts, s, max_new_tokens=6)
        assert out.token_ids == [_cut(r) for r in kv.hf_greedy(model, tok, prompts, 6)]
        assert out.stats["compiled_steps"] > 0 and "compile_fallback" not in out.stats
