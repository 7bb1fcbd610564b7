"""Strategies: JSON round trip, component resolution, bad input before any compute."""

import json

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import decodekit
from decodekit import DecodekitError, Greedy, HFProcessor, NoCache, Strategy
from decodekit.testing import hf_greedy


def test_json_round_trip():
    s = Strategy(cache="NoCache", sampler={"name": "Greedy"}, stop=["\n\n"], stop_at_eos=False)
    text = s.to_json()
    back = Strategy.from_json(text)
    assert isinstance(back.cache, NoCache) and isinstance(back.sampler, Greedy)
    assert back.to_dict() == s.to_dict() == json.loads(text)


def test_unknown_component_names_the_distribution(monkeypatch):
    monkeypatch.setenv("DECODEKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(DecodekitError, match="decodekit-samplers"):
        Strategy.from_json('{"processors": [{"name": "TopK", "top_k": 5}]}')
    with pytest.raises(DecodekitError, match="decodekit-fsm"):
        Strategy.from_dict({"processors": ["BannedWords"]})
    with pytest.raises(DecodekitError, match="unknown decodekit component 'Nope'"):
        Strategy.from_dict({"sampler": "Nope"})


def test_bad_strategy_documents():
    with pytest.raises(DecodekitError, match="not valid JSON"):
        Strategy.from_json("{nope")
    with pytest.raises(DecodekitError, match="unknown strategy field"):
        Strategy.from_dict({"procesors": []})
    with pytest.raises(DecodekitError, match="is a cache, not a sampler"):
        Strategy(sampler="NoCache")
    with pytest.raises(DecodekitError, match="needs a 'name'"):
        Strategy(processors=[{"top_k": 3}])


def test_hf_logits_processor_is_accepted(llama, tok):
    """A transformers LogitsProcessor plugs in as a processor and behaves as inside generate."""
    rep = RepetitionPenaltyLogitsProcessor(penalty=3.0)
    s = Strategy(cache=NoCache(), processors=[rep], stop_at_eos=False)
    assert isinstance(s.processors[0], HFProcessor)
    got = decodekit.generate(llama, tok, ["the cat", "a"], s, max_new_tokens=10)
    enc = tok(["the cat", "a"], return_tensors="pt", padding=True, padding_side="left")
    out = llama.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False, repetition_penalty=3.0, pad_token_id=0)
    assert got.token_ids == out[:, enc.input_ids.shape[1]:].tolist()
    assert got.token_ids != hf_greedy(llama, tok, ["the cat", "a"], 10)  # the penalty changed something
    with pytest.raises(DecodekitError, match="cannot be saved"):
        s.to_json()


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {"max_new_tokens": 4}, "prompts is empty"),
        (["ok", ""], {"max_new_tokens": 4}, "prompt 1 is empty"),
        ("ok", {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ("ok", {"max_new_tokens": 600}, "exceeds the model's context of 512"),
        ("the " * 600, {"max_new_tokens": 1}, "longer than the model's context of 512"),
        (["ok", "x"], {"max_new_tokens": 2, "seed": [1]}, "one per prompt"),
    ],
)
def test_bad_input_fails_before_any_compute(llama, tok, prompts, kwargs, match):
    calls = []
    handle = llama.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(DecodekitError, match=match):
            decodekit.generate(llama, tok, prompts, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_tokenizer_without_pad_token_batches(llama, tok):
    """No pad token: decodekit picks the EOS id (left padding is masked, so any id is correct)."""
    import copy

    t2 = copy.deepcopy(tok)
    t2.pad_token = None
    assert t2.pad_token_id is None
    a = decodekit.generate(llama, t2, ["the cat", "a"], Strategy(stop_at_eos=False), max_new_tokens=6)
    assert a.token_ids == hf_greedy(llama, tok, ["the cat", "a"], 6)


def test_stream_equals_generate(llama, tok):
    s = Strategy(stop_at_eos=False)
    full = decodekit.generate(llama, tok, "the cat", s, max_new_tokens=12).texts[0]
    assert "".join(decodekit.stream(llama, tok, "the cat", s, max_new_tokens=12)) == full
    rows = {}
    for r, d in decodekit.stream(llama, tok, ["the cat", "a"], s, max_new_tokens=12):
        rows[r] = rows.get(r, "") + d
    assert rows[0] == full


def test_interrupted_stream_keeps_what_was_committed(llama, tok):
    s = Strategy(stop_at_eos=False)
    it = decodekit.stream(llama, tok, "the cat", s, max_new_tokens=30)
    first = [next(it) for _ in range(3)]
    it.close()  # the generator stops; a new generation with the same components works
    full = decodekit.generate(llama, tok, "the cat", s, max_new_tokens=30).texts[0]
    assert full.startswith("".join(first))


def test_transformers_streamer(llama, tok):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    res = decodekit.generate(llama, tok, "the cat", Strategy(stop_at_eos=False), max_new_tokens=8, streamer=streamer)
    assert "".join(streamer) == tok.decode(res.token_ids[0])
    # Without skip_prompt the prompt comes first, as transformers' generate sends it.
    streamer = TextIteratorStreamer(tok)
    decodekit.generate(llama, tok, "the cat", Strategy(stop_at_eos=False), max_new_tokens=8, streamer=streamer)
    assert "".join(streamer) == tok.decode(tok("the cat").input_ids + res.token_ids[0])
