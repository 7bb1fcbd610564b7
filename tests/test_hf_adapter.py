"""decodekit processors inside transformers' generate (decodekit.hf.as_logits_processor).

Oracles: transformers' own processors (RepetitionPenalty, NoRepeatNGram) run by generate itself, and
a fresh adapter fed only the final prefix (a fresh recompute) for the rollback/reorder logic.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

import decodekit
from decodekit.hf import as_logits_processor
from decodekit.testing import tiny_model, tiny_tokenizer

samplers = pytest.importorskip("decodekit_samplers")

PROMPTS = ["the cat and the dog and the cat", "in the end"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")


def _chain():
    return [samplers.RepetitionPenalty(1.3), samplers.NoRepeatNGram(2)]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_adapter_greedy_equals_transformers_processors(arch, tok, batch):
    model = tiny_model(arch)
    adapter = as_logits_processor(_chain(), tok)
    ours = model.generate(**batch, max_new_tokens=24, do_sample=False, logits_processor=LogitsProcessorList([adapter]))
    theirs = model.generate(**batch, max_new_tokens=24, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert torch.equal(ours, theirs)
    assert adapter.calls["restarts"] == 0


def test_adapter_sampling_seeded_equals_transformers(tok, batch):
    model = tiny_model("llama")
    chain = [samplers.RepetitionPenalty(1.2), samplers.Temperature(0.8), samplers.TopK(20), samplers.TopP(0.9)]
    torch.manual_seed(3)
    ours = model.generate(**batch, max_new_tokens=20, do_sample=True, top_k=0, logits_processor=LogitsProcessorList([as_logits_processor(chain, tok)]))
    torch.manual_seed(3)
    theirs = model.generate(**batch, max_new_tokens=20, do_sample=True, repetition_penalty=1.2, temperature=0.8, top_k=20, top_p=0.9)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rollback", [True, False])
def test_adapter_beam_search_equals_transformers(rollback, tok, batch):
    model = tiny_model("llama", seed=1)
    adapter = as_logits_processor(_chain(), tok, rollback=rollback)
    kw = dict(max_new_tokens=16, num_beams=4, num_return_sequences=2, do_sample=False)
    ours = model.generate(**batch, logits_processor=LogitsProcessorList([adapter]), **kw)
    theirs = model.generate(**batch, repetition_penalty=1.3, no_repeat_ngram_size=2, **kw)
    assert torch.equal(ours, theirs)
    assert adapter.calls["rolled_back"] > 0, "beams never reordered: the test lost its point"


@pytest.mark.parametrize("rollback", [True, False])
def test_adapter_prompt_lookup_equals_transformers(rollback, tok):
    # A repetitive prompt so prompt lookup proposes candidates, most rejected by a random model:
    # the adapter is called on prefixes that are later cut back.
    model = tiny_model("llama", seed=2)
    ids = tok(["the cat and the dog and the cat and the dog and the"], return_tensors="pt")
    # (no NoRepeatNGram here: it forbids the very repeats prompt lookup feeds on)
    adapter = as_logits_processor([samplers.RepetitionPenalty(1.3)], tok, rollback=rollback)
    kw = dict(max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4)
    ours = model.generate(**ids, logits_processor=LogitsProcessorList([adapter]), **kw)
    theirs = model.generate(**ids, repetition_penalty=1.3, **kw)
    assert torch.equal(ours, theirs)
    assert adapter.calls["rolled_back"] > 0, "prompt lookup never cut a prefix back: the test lost its point"


def _random_walk(B, P, V, steps, seed):
    """Sequences that grow, get cut back by different amounts per row and rows that swap: what
    assisted decoding and beam search do to a processor's input_ids."""
    g = torch.Generator().manual_seed(seed)
    # Beams of one prompt: reordering rows never changes the prompt columns.
    seq = torch.randint(3, V, (1, P), generator=g).expand(B, P)
    out = [seq]
    for _ in range(steps):
        kind = torch.randint(0, 3, (1,), generator=g).item()
        if kind == 0 and seq.shape[1] > P + 2:  # assisted: cut back, then candidates
            cut = torch.randint(1, seq.shape[1] - P, (1,), generator=g).item()
            seq = seq[:, : seq.shape[1] - cut]
        elif kind == 1:  # beam search: rows reorder
            seq = seq[torch.randint(0, B, (B,), generator=g)]
        seq = torch.cat([seq, torch.randint(3, V, (B, torch.randint(1, 4, (1,), generator=g).item()), generator=g)], 1)
        out.append(seq)
    return out


@pytest.mark.parametrize("rollback", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_adapter_state_equals_fresh_recompute(rollback, seed, tok):
    V = len(tok)
    chain = lambda: [samplers.RepetitionPenalty(1.5), samplers.NoRepeatNGram(2), samplers.FrequencyPenalty(0.7)]  # noqa: E731
    adapter = as_logits_processor(chain(), tok, rollback=rollback, pad_token_id=0)
    adapter.max_new_tokens = 8  # force the grow-and-rebuild path too
    g = torch.Generator().manual_seed(100 + seed)
    for ids in _random_walk(B=3, P=5, V=V, steps=25, seed=seed):
        scores = torch.randn(3, V, generator=g)
        fresh = as_logits_processor(chain(), tok, pad_token_id=0)
        fresh(ids[:, :5], torch.zeros(3, V))  # the same prompt starts the same generation
        want = fresh(ids, scores.clone())
        got = adapter(ids, scores.clone())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert adapter.calls["rolled_back"] > 0 and adapter.calls["restarts"] > 0  # both paths ran


def test_adapter_new_prompt_starts_over(tok):
    adapter = as_logits_processor(_chain(), tok)
    a = tok(["the cat and the cat"], return_tensors="pt").input_ids
    b = tok(["in the end"], return_tensors="pt").input_ids
    V = len(tok)
    adapter(a, torch.zeros(1, V))
    scores = torch.randn(1, V)
    got = adapter(b, scores.clone())
    want = as_logits_processor(_chain(), tok)(b, scores.clone())
    assert torch.equal(got, want)
    assert adapter.calls["restarts"] == 1


def test_adapter_refuses_what_it_cannot_run(tok):
    with pytest.raises(decodekit.DecodekitError, match="Strategy.sampler=Multinomial"):
        as_logits_processor(decodekit.Strategy(processors=[samplers.TopK(5)], sampler=samplers.Multinomial()))
    with pytest.raises(decodekit.DecodekitError, match="Strategy.drafter"):
        spec = pytest.importorskip("decodekit_speculative")
        as_logits_processor(decodekit.Strategy(drafter=spec.PromptLookup()))
    with pytest.raises(decodekit.DecodekitError, match="item 0 is a int"):
        as_logits_processor([3])


def test_adapter_accepts_a_strategy_json(tok, batch):
    model = tiny_model("llama")
    text = decodekit.Strategy(processors=_chain()).to_json()
    ours = model.generate(**batch, max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([as_logits_processor(text, tok)]))
    theirs = model.generate(**batch, max_new_tokens=12, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert torch.equal(ours, theirs)
