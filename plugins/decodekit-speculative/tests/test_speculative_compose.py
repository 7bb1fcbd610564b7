"""Drafters compose with stateful processors (penalties, BannedWords) through accept/rollback."""

import pytest
import torch

import decodekit
from decodekit import Strategy
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative

PROMPTS = ["the cat and the dog and the cat and the", "on and on and on", "hello there, is it the end", "a"]


def drafter(name, drafts):
    return {
        "lookup": PromptLookup(ngram=2, k=4),
        "draft-model": DraftModel(model=drafts["llama"], k=3),
        "self-spec": SelfSpeculative(skip_mlp=[1], k=3, adaptive=False),
    }[name]


@pytest.mark.parametrize("name", ["lookup", "draft-model", "self-spec"])
def test_penalties_match_transformers(models, drafts, tok, make_cache, name):
    """Oracle: transformers' generate with repetition_penalty and no_repeat_ngram_size."""
    pytest.importorskip("decodekit_samplers")
    from decodekit_samplers import NoRepeatNGram, RepetitionPenalty

    model, n = models["llama"], 20
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    want = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.5,
                          no_repeat_ngram_size=2, pad_token_id=0)[:, enc.input_ids.shape[1]:].tolist()
    st = Strategy(cache=make_cache(), processors=[RepetitionPenalty(1.5), NoRepeatNGram(2)], drafter=drafter(name, drafts), stop_at_eos=False)
    got = decodekit.generate(model, tok, PROMPTS, st, max_new_tokens=n)
    assert got.token_ids == want
    assert got.stats["drafted"] > 0


@pytest.mark.parametrize("mode", ["mask", "rollback"])
@pytest.mark.parametrize("name", ["lookup", "draft-model", "self-spec"])
def test_banned_words_with_drafters(models, drafts, tok, name, mode):
    """The text never holds a banned word, and the output equals the same strategy without a
    drafter (rollbacks requested by BannedWords reach the drafter's own state)."""
    pytest.importorskip("decodekit_fsm")
    from decodekit_fsm import BannedWords

    model, n = models["llama"], 24
    plain = decodekit.generate(model, tok, PROMPTS, Strategy(stop_at_eos=False), max_new_tokens=n)
    # ban a word the unconstrained output actually produces, so the ban has to act
    text = plain.texts[0]
    word = next(text[i:i + 2] for i in range(len(text) - 1) if text[i:i + 2].strip() == text[i:i + 2])
    banned = BannedWords(words=[word], mode=mode)
    ref = decodekit.generate(model, tok, PROMPTS, Strategy(processors=[banned], stop_at_eos=False), max_new_tokens=n)
    got = decodekit.generate(model, tok, PROMPTS, Strategy(processors=[BannedWords(words=[word], mode=mode)], drafter=drafter(name, drafts), stop_at_eos=False), max_new_tokens=n)
    assert ref.token_ids != plain.token_ids  # the ban acted
    assert all(word not in t for t in got.texts)
    assert got.token_ids == ref.token_ids
