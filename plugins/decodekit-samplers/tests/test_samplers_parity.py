"""Stateless processors against transformers' own processors on random logits: ties, -inf
entries, fp32 and bf16, and per-row parameters against one transformers call per row."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers.generation import logits_process as hf

import decodekit
from decodekit_samplers import filters as F

V = 300


def random_logits(B: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[B, V] float32 logits with exact ties and some -inf entries.

    fp32: values on a coarse grid (~20 distinct values). bf16: logits as a bf16 model emits them
    (8-bit mantissa, so ties are frequent), upcast to float32 the way both decodekit's loop
    (``state.scores`` is float32 by contract) and transformers' ``generate`` feed processors.
    """
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        x = (torch.randn(B, V, generator=g) * 3).round() / 2
    else:
        x = (torch.randn(B, V, generator=g) * 4).to(dtype).float()
    x[torch.rand(B, V, generator=g) < 0.1] = float("-inf")
    return x


def ours(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """Run a decodekit function on [B, V] logits as a single verify position [B, 1, V]."""
    return fn(x[:, None], *args)[:, 0]


def col(v, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype).view(-1, 1, 1)


CASES = [
    # (name, transformers processor, decodekit call)
    ("temperature", lambda v: hf.TemperatureLogitsWarper(v), lambda x, v: ours(F.temperature, x, col([v]))),
    ("top_k", lambda v: hf.TopKLogitsWarper(v), lambda x, v: ours(F.top_k, x, v, v)),
    ("top_p", lambda v: hf.TopPLogitsWarper(v), lambda x, v: ours(F.top_p, x, col([v]))),
    ("min_p", lambda v: hf.MinPLogitsWarper(v), lambda x, v: ours(F.min_p, x, col([v]))),
    ("typical", lambda v: hf.TypicalLogitsWarper(v), lambda x, v: ours(F.typical, x, col([v]))),
    ("epsilon", lambda v: hf.EpsilonLogitsWarper(v), lambda x, v: ours(F.epsilon_cutoff, x, col([v]))),
    ("eta", lambda v: hf.EtaLogitsWarper(v), lambda x, v: ours(F.eta_cutoff, x, col([v]))),
]
VALUES = {
    "temperature": [0.3, 0.7, 1.5], "top_k": [1, 5, 40, 1000], "top_p": [0.1, 0.5, 0.9, 1.0],
    "min_p": [0.0, 0.05, 0.3, 1.0], "typical": [0.2, 0.5, 0.95], "epsilon": [1e-3, 0.01, 0.2],
    "eta": [1e-3, 0.01, 0.2],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,make_hf,call", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(name, make_hf, call, dtype):
    ids = torch.zeros(6, 3, dtype=torch.long)
    for seed in range(4):
        x = random_logits(6, dtype, seed)
        for v in VALUES[name]:
            want = make_hf(v)(ids, x.clone())
            got = call(x.clone(), v)
            assert torch.equal(got, want), (name, v, seed, (got != want).sum())


@pytest.mark.parametrize("min_keep", [1, 3])
def test_min_tokens_to_keep_matches_transformers(min_keep):
    ids = torch.zeros(6, 1, dtype=torch.long)
    x = random_logits(6, torch.float32, 7)
    for want, got in [
        (hf.TopPLogitsWarper(0.05, min_tokens_to_keep=min_keep)(ids, x), ours(F.top_p, x, col([0.05]), min_keep)),
        (hf.MinPLogitsWarper(0.9, min_tokens_to_keep=min_keep)(ids, x), ours(F.min_p, x, col([0.9]), min_keep)),
        (hf.TypicalLogitsWarper(0.05, min_tokens_to_keep=min_keep)(ids, x), ours(F.typical, x, col([0.05]), min_keep)),
        (hf.EpsilonLogitsWarper(0.5, min_tokens_to_keep=min_keep)(ids, x), ours(F.epsilon_cutoff, x, col([0.5]), min_keep)),
        (hf.EtaLogitsWarper(0.5, min_tokens_to_keep=min_keep)(ids, x), ours(F.eta_cutoff, x, col([0.5]), min_keep)),
    ]:
        assert torch.equal(got, want)


def test_logit_bias_matches_sequence_bias():
    from decodekit_samplers import LogitBias

    bias = {3: 2.5, 17: -1.0, 299: float("-inf")}
    x = random_logits(4, torch.float32, 3)
    want = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.zeros(4, 2, dtype=torch.long), x)
    comp = LogitBias(bias)
    state = _fake_state(4, x[:, None])
    comp.setup(state)
    assert torch.equal(comp.process_logits(state)[:, 0], want)


# ------------------------------------------------------------------------------ per-row parameters
def _fake_state(B, scores, seeds=None):
    from decodekit.state import DecodeState

    st = DecodeState(model=None, tokenizer=None, device=torch.device("cpu"), batch_size=B, vocab_size=scores.shape[-1],
                     prompt_ids=[[1]] * B, prompt_lengths=torch.ones(B, dtype=torch.long),
                     seeds=torch.arange(B) if seeds is None else seeds, max_new_tokens=8,
                     eos_token_ids=torch.tensor([2]), pad_token_id=0)
    st.scores = scores
    st.proposals = torch.zeros(B, scores.shape[1] - 1, dtype=torch.long)
    st.committed = torch.full((B,), 5)
    return st


@pytest.mark.parametrize("cls,field,values,make_hf", [
    ("Temperature", "temperature", [0.5, 1.0, 2.0], hf.TemperatureLogitsWarper),
    ("TopK", "top_k", [1, 7, 50], hf.TopKLogitsWarper),
    ("TopP", "top_p", [0.3, 0.8, 1.0], hf.TopPLogitsWarper),
    ("MinP", "min_p", [0.0, 0.1, 0.5], hf.MinPLogitsWarper),
    ("Typical", "typical_p", [0.3, 0.6, 0.9], hf.TypicalLogitsWarper),
    ("EpsilonCutoff", "epsilon_cutoff", [0.001, 0.01, 0.05], hf.EpsilonLogitsWarper),
    ("EtaCutoff", "eta_cutoff", [0.001, 0.01, 0.05], hf.EtaLogitsWarper),
])
def test_per_row_parameters_match_one_call_per_row(cls, field, values, make_hf):
    import decodekit_samplers as S

    x = random_logits(3, torch.float32, 11)
    T = 2
    scores = torch.stack([x, x.flip(-1)], 1)  # [B, T, V]
    comp = getattr(S, cls)(**{field: values})
    state = _fake_state(3, scores.clone())
    comp.setup(state)
    got = comp.process_logits(state)
    for r, v in enumerate(values):
        for t in range(T):
            want = make_hf(v)(torch.zeros(1, 1, dtype=torch.long), scores[r, t][None].clone())[0]
            assert torch.equal(got[r, t], want), (cls, r, t)


def test_per_row_list_must_match_batch_size():
    from decodekit_samplers import TopP

    comp = TopP([0.5, 0.9])
    with pytest.raises(decodekit.DecodekitError, match=r"TopP.top_p has 2 values for a batch of 3"):
        comp.setup(_fake_state(3, torch.zeros(3, 1, V)))


# ------------------------------------------------------------------------------ llama.cpp-only filters
def test_top_n_sigma_brute_force():
    x = random_logits(5, torch.float32, 5)
    for n in [0.0, 0.5, 1.0, 2.0]:
        got = ours(F.top_n_sigma, x, col([n]))
        for r in range(5):
            finite = [v for v in x[r].tolist() if v != float("-inf")]
            mean = sum(finite) / len(finite)
            std = (sum((v - mean) ** 2 for v in finite) / len(finite)) ** 0.5
            keep = [v >= max(finite) - n * std for v in x[r].tolist()]
            assert [v != float("-inf") for v in got[r].tolist()] == keep


def test_xtc_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * 2
    x[0, :3] = 5.0  # three tied top tokens: all tie with the weakest survivor, so all stay
    thr = 0.1
    coin = torch.tensor([True, True, True, False, True, True]).view(6, 1, 1)
    got = F.xtc(x[:, None], col([thr] * 6), coin)[:, 0]
    p = x.softmax(-1)
    for r in range(6):
        above = [i for i in range(40) if p[r, i] >= thr]
        keep = set(range(40))
        if coin[r, 0, 0] and len(above) >= 2:
            weakest = min(p[r, i] for i in above)
            keep -= {i for i in above if p[r, i] > weakest}
        assert {i for i in range(40) if got[r, i] != float("-inf")} == keep


def test_xtc_coin_rate_follows_probability():
    from decodekit_samplers import XTC

    B, T = 4000, 1
    x = torch.tensor([3.0, 2.5, 0.0, 0.0]).repeat(B, T, 1)  # two tokens above threshold 0.1
    state = _fake_state(B, x, seeds=torch.arange(B) * 7 + 1)
    comp = XTC(probability=0.3, threshold=0.1)
    comp.setup(state)
    out = comp.process_logits(state)
    rate = (out[:, 0, 0] == float("-inf")).float().mean().item()
    assert abs(rate - 0.3) < 0.03  # 4000 Bernoulli(0.3) draws: sd 0.007


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make,field,allowed", [
    (lambda S: S.Temperature(0), "temperature", "(0, inf)"),
    (lambda S: S.Temperature(-0.5), "temperature", "(0, inf)"),
    (lambda S: S.Temperature([0.5, 0.0]), "temperature", "(0, inf)"),
    (lambda S: S.TopP(0), "top_p", "(0, 1]"),
    (lambda S: S.TopP(1.01), "top_p", "(0, 1]"),
    (lambda S: S.TopK(0), "top_k", "[1, inf)"),
    (lambda S: S.MinP(-0.1), "min_p", "[0, 1]"),
    (lambda S: S.Typical(0), "typical_p", "(0, 1]"),
    (lambda S: S.EpsilonCutoff(1), "epsilon_cutoff", "[0, 1)"),
    (lambda S: S.RepetitionPenalty(0), "repetition_penalty", "(0, inf)"),
    (lambda S: S.XTC(threshold=0.7), "threshold", "[0, 0.5]"),
    (lambda S: S.LogitBias({-3: 1.0}), "logit_bias", "[0, vocab_size)"),
])
def test_bad_values_name_field_and_range(make, field, allowed):
    import decodekit_samplers as S

    with pytest.raises(ValidationError) as e:
        make(S)
    assert e.value.errors()[0]["loc"][0] == field
    assert allowed in str(e.value)


def test_logit_bias_checks_vocabulary_at_setup():
    from decodekit_samplers import LogitBias

    comp = LogitBias({5: 1.0, 300: 2.0})
    with pytest.raises(ValidationError, match=r"\[300\] outside the vocabulary: ids must be in \[0, 300\)"):
        comp.setup(_fake_state(2, torch.zeros(2, 1, 300)))
    with pytest.raises(ValidationError, match="logit_bias"):
        LogitBias.check_vocab({400: 1.0}, 300)


def test_plugin_is_installed_and_strategy_json_round_trips():
    decodekit.reset_plugin_manager()
    names = decodekit.get_plugin_manager().components
    for n in ["Temperature", "TopK", "TopP", "MinP", "Typical", "EpsilonCutoff", "EtaCutoff", "RepetitionPenalty",
              "PresencePenalty", "FrequencyPenalty", "NoRepeatNGram", "LogitBias", "TopNSigma", "XTC", "DRY",
              "Mirostat", "Multinomial"]:
        assert n in names
    s = decodekit.Strategy.from_json(
        '{"processors": [{"name": "RepetitionPenalty", "repetition_penalty": 1.2}, {"name": "Temperature", "temperature": [0.7, 1.0]},'
        ' {"name": "TopK", "top_k": 20}, {"name": "LogitBias", "logit_bias": {"5": -2.0}}], "sampler": "Multinomial"}'
    )
    assert [type(p).__name__ for p in s.processors] == ["RepetitionPenalty", "Temperature", "TopK", "LogitBias"]
    assert s.processors[3].logit_bias == {5: -2.0}
    assert decodekit.Strategy.from_json(s.to_json()).to_dict() == s.to_dict()
