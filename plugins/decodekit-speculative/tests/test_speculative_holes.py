"""The compiled static path keeps rejected drafts as holes (``Cache.keeps_holes``): no host sync
per step to trim them, so slots run out faster and the cache compacts. Greedy must stay
token-identical to transformers' greedy through many compactions, for every drafter, at batch 1
(where holes used to be trimmed away every step) and batch 4."""

import pytest

import decodekit
from decodekit import Strategy
from decodekit.testing import tiny_model
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative

PROMPTS = ["the cat and the dog and the cat and the", "on and on and on", "hello there, is it the end", "a"]
N = 40


def drafter(name):
    if name == "lookup":
        return PromptLookup(ngram=3, k=5, fixed_width=True)
    if name == "draft-model":
        return DraftModel(model=tiny_model("llama", seed=2), k=3, compile=True, compile_backend="eager")
    return SelfSpeculative(skip_mlp=[1], k=3, adaptive=False, compile=True, compile_backend="eager")


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["lookup", "draft-model", "self-spec"])
def test_holes_and_compactions_keep_greedy_exact(models, tok, oracle, batch, name):
    prompts = PROMPTS[:batch]
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    T_max = 8 if name == "lookup" else 4  # bucket(1 + k)
    # The smallest buffer the cache accepts: prompt + new tokens + one verify width, no room for
    # holes, so nearly every step with a rejection ends in a compaction.
    cache = {"name": "StaticCache", "compile": True, "compile_backend": "eager", "max_len": longest + N + T_max - 1}
    res = decodekit.generate(models["llama"], tok, prompts, Strategy(cache=cache, drafter=drafter(name), stop_at_eos=False),
                             max_new_tokens=N)
    assert res.token_ids == oracle("llama", prompts, N)
    assert res.stats["compactions"] >= 1
    assert res.stats["compiled_steps"] == res.stats["forward_passes"] - 1
