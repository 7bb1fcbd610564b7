"""Multinomial: samples the distribution the chain leaves (chi-square), one stream per row (a
row's output does not depend on its batch-mates), and a short real-model run."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

import decodekit
import decodekit_samplers as S
from decodekit.state import DecodeState
from decodekit.testing import tiny_model, tiny_tokenizer


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """P(chi2_df >= stat) with df = support - 1, via the regularised upper incomplete gamma."""
    support = expected > 0
    stat = ((observed[support] - expected[support]) ** 2 / expected[support]).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def test_chain_then_multinomial_samples_the_expected_distribution():
    V, N = 12, 60_000
    logits = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0, -2.0, -3.0, float("-inf")])
    procs = [S.Temperature(0.8), S.TopK(9), S.TopP(0.9), S.MinP(0.05)]
    # N rows, each with its own seed, one draw each: the draws are independent samples.
    state = DecodeState(model=None, tokenizer=None, device=torch.device("cpu"), batch_size=N, vocab_size=V,
                        prompt_ids=[[1]] * N, prompt_lengths=torch.ones(N, dtype=torch.long),
                        seeds=torch.arange(N) * 7919 + 13, max_new_tokens=4, eos_token_ids=torch.tensor([]),
                        pad_token_id=0)
    state.committed = torch.full((N,), 9)
    state.proposals = torch.zeros(N, 0, dtype=torch.long)
    state.scores = logits.repeat(N, 1, 1)
    for p in procs:
        p.setup(state)
        state.scores = p.process_logits(state)
    tokens, probs = S.Multinomial().sample(state)
    assert probs is None  # no sampled drafts: the distribution is not needed
    # expected: transformers' own warpers, then softmax
    want = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    for w in [hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(9), hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.05)]:
        want = w(ids, want)
    p = want.softmax(-1)[0]
    observed = torch.bincount(tokens[:, 0], minlength=V).double()
    assert observed[p == 0].sum() == 0  # filtered tokens never drawn
    assert chi_square_p_value(observed, p.double() * N) > 1e-3
    # and it can fail: the unfiltered distribution is rejected
    assert chi_square_p_value(observed, logits.softmax(-1).double() * N) < 1e-6


def test_rows_do_not_depend_on_batch_mates():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    strategy = decodekit.Strategy(processors=[S.Temperature(1.5), S.TopP(0.95)], sampler="Multinomial")
    prompts = ["the cat", "and on and on", "he is"]
    batch = decodekit.generate(model, tok, prompts, strategy, max_new_tokens=8, seed=[10, 20, 30])
    for r, p in enumerate(prompts):
        alone = decodekit.generate(model, tok, [p], strategy, max_new_tokens=8, seed=[[10, 20, 30][r]])
        assert alone.token_ids[0] == batch.token_ids[r]
    other = decodekit.generate(model, tok, prompts, strategy, max_new_tokens=8, seed=[11, 21, 31])
    assert other.token_ids != batch.token_ids  # the seed matters


def test_per_row_temperature_in_one_batch_equals_separate_runs():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    prompts = ["the cat", "the cat"]
    both = decodekit.generate(model, tok, prompts, decodekit.Strategy(processors=[S.Temperature([0.3, 3.0])], sampler="Multinomial"),
                              max_new_tokens=10, seed=[1, 1])
    for r, t in enumerate([0.3, 3.0]):
        one = decodekit.generate(model, tok, [prompts[r]], decodekit.Strategy(processors=[S.Temperature(t)], sampler="Multinomial"),
                                 max_new_tokens=10, seed=[1])
        assert one.token_ids[0] == both.token_ids[r]


@pytest.mark.real_model
def test_real_model_chain_from_json():
    model, tok = decodekit.load_model()
    strategy = decodekit.Strategy.from_json(
        '{"processors": [{"name": "RepetitionPenalty", "repetition_penalty": 1.1}, {"name": "Temperature", "temperature": 0.7},'
        ' {"name": "TopK", "top_k": 40}, {"name": "TopP", "top_p": 0.9}, {"name": "MinP", "min_p": 0.05}],'
        ' "sampler": "Multinomial"}'
    )
    a = decodekit.generate(model, tok, "Name three fruits.", strategy, max_new_tokens=8, seed=7, chat=True)
    assert len(a.token_ids[0]) > 0 and a.texts[0].strip()
    assert all(0 <= t < model.config.vocab_size for t in a.token_ids[0])
