"""Bad input fails before compute with a message naming the field, the value and the fix."""

import json

import pytest
from pydantic import ValidationError

import decodekit
from decodekit import DecodekitError, Strategy
from decodekit.testing import tiny_model
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative


@pytest.mark.parametrize("make", [lambda: PromptLookup(k=0), lambda: SelfSpeculative(k=0), lambda: DraftModel(model=None, k=0)])
def test_k_below_one(make):
    with pytest.raises(ValidationError, match=r"k.*must be >= 1, got 0"):
        make()


def test_other_bad_fields():
    with pytest.raises(ValidationError, match=r"min_ngram \(4\) must be <= ngram \(2\)"):
        PromptLookup(ngram=2, min_ngram=4)
    with pytest.raises(ValidationError, match="temperature must be > 0"):
        DraftModel(model=None, temperature=0)
    with pytest.raises(ValidationError, match=r"alpha must be in \[0, 1\]"):
        SelfSpeculative(alpha=1.5)
    with pytest.raises(ValidationError, match="negative layer indices"):
        SelfSpeculative(skip_mlp=[-1])


def test_draft_model_with_another_vocabulary(models, tok):
    other = tiny_model("llama", vocab_size=400)
    with pytest.raises(DecodekitError, match=r"vocabulary has 400 tokens, the target's 330"):
        decodekit.generate(models["llama"], tok, "hello", Strategy(drafter=DraftModel(model=other)), max_new_tokens=4)


def test_layer_index_out_of_range(models, tok):
    with pytest.raises(DecodekitError, match=r"skip_attention holds layer indices \[7\]; the model has 2 layers \(0..1\)"):
        decodekit.generate(models["llama"], tok, "hello", Strategy(drafter=SelfSpeculative(skip_attention=[7])), max_new_tokens=4)


def test_static_cache_too_short_for_prompt_plus_k(models, tok):
    kv = pytest.importorskip("decodekit_kvcache")
    prompt = "the cat and the dog"  # 10 tokens
    n_prompt = len(tok(prompt)["input_ids"])
    st = Strategy(cache=kv.StaticCache(max_len=n_prompt + 4 + 2), drafter=PromptLookup(k=8))
    with pytest.raises(DecodekitError, match="StaticCache"):
        decodekit.generate(models["llama"], tok, prompt, st, max_new_tokens=4)


def test_skip_file_errors_and_round_trip(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValidationError, match="does not exist; create it with: decodekit search-skip"):
        SelfSpeculative(skip_file=str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"skip_mlp": [1]}))
    with pytest.raises(ValidationError, match=r"lacks \['skip_attention'\]"):
        SelfSpeculative(skip_file=str(bad))
    good = tmp_path / "skip.json"
    good.write_text(json.dumps({"skip_attention": [3, 1], "skip_mlp": [2], "k": 5}))
    assert SelfSpeculative(skip_file=str(good)).skip_attention == [1, 3]
    s = SelfSpeculative.from_file(good, adaptive=False)
    assert (s.skip_attention, s.skip_mlp, s.k, s.adaptive) == ([3, 1], [2], 5, False)


def test_json_strategies():
    st = Strategy.from_dict({"drafter": {"name": "PromptLookup", "ngram": 2, "k": 6}})
    assert isinstance(st.drafter, PromptLookup) and st.drafter.k == 6
    assert Strategy.from_json(st.to_json()).drafter == st.drafter
    st = Strategy.from_dict({"drafter": {"name": "SelfSpeculative", "skip_attention": [1], "k": 4}})
    assert Strategy.from_json(st.to_json()).drafter.skip_attention == [1]
    with pytest.raises(DecodekitError, match="cannot be saved as JSON"):
        Strategy(drafter=DraftModel(model=tiny_model("llama"))).to_json()


def test_plugin_is_installed():
    pm = decodekit.get_plugin_manager()
    for name in ("DraftModel", "PromptLookup", "SelfSpeculative"):
        assert pm.component_plugin[name] == "speculative"
