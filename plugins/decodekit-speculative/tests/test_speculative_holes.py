"""The compiled static path keeps rejected drafts as holes (``Cache.keeps_holes``): no host sync
per step to trim them, so slots run out faster and the cache compacts. Greedy must stay
token-identical to transformers' greedy through many compactions, for every drafter, at batch 1
(where holes used to be trimmed away every step) and batch 4."""

import pytest
import torch

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


def test_an_eager_draft_follows_the_targets_compactions(tok):
    """An eager draft network (compile=False) beside the compiled target: after a compaction the
    target's slots sit at other indices, so the draft must start over, or it drafts from the wrong
    context (exact output still, but acceptance collapsed: 0.04 instead of 0.37 here). Oracle: the
    same drafts, hence the same acceptance, as beside a DynamicCache target (which never compacts)."""
    target = tiny_model("llama")
    prompt = ["the cat and the dog and the cat"]
    n = 60
    L = len(tok(prompt[0])["input_ids"])
    got = {}
    for name, cache in [("dynamic", {"name": "DynamicCache"}),
                        ("static", {"name": "StaticCache", "compile": True, "compile_backend": "eager", "max_len": L + n + 3})]:
        draft = tiny_model("llama", seed=0)
        torch.manual_seed(5)
        with torch.no_grad():  # a draft close to the target: it agrees often, not always
            draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * 0.1)
        r = decodekit.generate(target, tok, prompt, Strategy(cache=cache, drafter=DraftModel(model=draft, k=3, compile=False),
                                                             stop_at_eos=False), max_new_tokens=n)
        got[name] = r
    assert got["static"].stats["compactions"] >= 2
    assert got["static"].token_ids == got["dynamic"].token_ids
    assert got["static"].stats["accepted"] == got["dynamic"].stats["accepted"]
