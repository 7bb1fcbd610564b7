"""Speculative sampling is lossless: token-identical to plain sampling for deterministic drafts (the
counter-based RNG draws the same numbers per position), and distributed exactly like plain sampling
for sampled drafts (checked against the brute-force distribution)."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

import decodekit
from decodekit import HFProcessor, Strategy
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative
from transformers import TemperatureLogitsWarper, TopKLogitsWarper

PROMPTS = ["the cat and the dog and the cat and the", "on and on and on", "hello there, is it the end", "a"]


def warpers(temperature, top_k):
    try:
        from decodekit_samplers import Temperature, TopK
    except ImportError:
        return [HFProcessor(processor=TemperatureLogitsWarper(temperature)), HFProcessor(processor=TopKLogitsWarper(top_k))]
    return [Temperature(temperature), TopK(top_k)]


@pytest.mark.parametrize("name", ["lookup", "draft-greedy", "self-spec"])
def test_deterministic_drafts_sample_token_identically(models, drafts, tok, make_cache, sampler, name):
    drafter = {
        "lookup": PromptLookup(ngram=2, k=4),
        "draft-greedy": DraftModel(model=drafts["llama"], k=3),
        "self-spec": SelfSpeculative(skip_mlp=[1], k=3, adaptive=False),
    }[name]
    procs = warpers(1.5, 20)
    kw = dict(max_new_tokens=24, seed=[3, 1, 4, 1])
    plain = decodekit.generate(models["llama"], tok, PROMPTS, Strategy(cache=make_cache(), processors=procs, sampler=sampler(), stop_at_eos=False), **kw)
    spec = decodekit.generate(models["llama"], tok, PROMPTS, Strategy(cache=make_cache(), processors=procs, sampler=sampler(), drafter=drafter, stop_at_eos=False), **kw)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["drafted"] > 0
    assert spec.stats["forward_passes"] <= plain.stats["forward_passes"]


def exact_distribution(model, tok, prompt, n, temperature, top_k):
    """Brute force: probability of every n-token continuation under top-k + temperature."""
    ids = tok(prompt)["input_ids"]
    warp_t, warp_k = TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)

    def dist(prefix):
        x = torch.tensor([prefix])
        scores = model(x).logits[:, -1].float()
        return torch.softmax(warp_k(x, warp_t(x, scores)), -1)[0]

    out = {}

    def walk(prefix, seq, p):
        if len(seq) == n:
            out[tuple(seq)] = p
            return
        d = dist(prefix)
        for t in torch.nonzero(d > 0)[:, 0].tolist():
            walk(prefix + [t], seq + [t], p * float(d[t]))

    walk(ids, [], 1.0)
    return out


def test_sampled_drafts_have_the_target_distribution(models, drafts, tok, sampler):
    """Leviathan et al.'s min(1, p/q) + residual + bonus: 3-token continuations over a top-3 support
    (27 outcomes), 4,000 seeds, chi-square against the exact distribution, speculative and plain."""
    n, N, temperature, top_k = 3, 4000, 2.0, 3
    prompt = "the cat and the"
    exact = exact_distribution(models["llama"], tok, prompt, n, temperature, top_k)
    assert abs(sum(exact.values()) - 1) < 1e-5 and len(exact) == top_k**n
    cells = sorted(exact)
    procs = warpers(temperature, top_k)
    # The draft samples the target's raw softmax (no top-k, another temperature): q != p, so it
    # accepts some and rejects some (the residual path), and q puts mass outside p's support.
    draft = DraftModel(model=models["llama"], k=2, sample=True, temperature=1.0)
    pvalues = {}
    for label, drafter in (("plain", None), ("speculative", draft)):
        st = Strategy(cache=decodekit.NoCache(), processors=procs, sampler=sampler(), drafter=drafter, stop_at_eos=False)
        got = decodekit.generate(models["llama"], tok, [prompt] * N, st, max_new_tokens=n, seed=list(range(N)))
        counts = {c: 0 for c in cells}
        for row in got.token_ids:
            counts[tuple(row)] += 1
        observed = [counts[c] for c in cells]
        expected = [exact[c] * N / sum(exact.values()) for c in cells]  # chisquare wants equal sums
        pvalues[label] = chisquare(observed, expected).pvalue
        if drafter is not None:
            assert 0.05 < got.stats["acceptance_rate"] < 0.95, got.stats
    assert pvalues["plain"] > 1e-3, pvalues
    assert pvalues["speculative"] > 1e-3, pvalues


def test_a_wrong_q_is_caught(models, drafts, tok, sampler):
    """The statistical test can fail: a drafter that lies about q (claims uniform) biases the output."""
    from decodekit_speculative.draft_model import DraftModel as DM

    class Liar(DM):
        def pre_logits(self, state):
            prop = super().pre_logits(state)
            if prop is not None:  # nothing is drafted on the last step
                prop.probs = torch.full_like(prop.probs, 1.0 / prop.probs.shape[-1])
            return prop

    n, N, temperature, top_k = 2, 4000, 2.0, 3
    prompt = "the cat and the"
    exact = exact_distribution(models["llama"], tok, prompt, n, temperature, top_k)
    cells = sorted(exact)
    st = Strategy(cache=decodekit.NoCache(), processors=warpers(temperature, top_k), sampler=sampler(),
                  drafter=Liar(model=models["llama"], k=2, sample=True, temperature=0.3), stop_at_eos=False)
    got = decodekit.generate(models["llama"], tok, [prompt] * N, st, max_new_tokens=n, seed=list(range(N)))
    counts = {c: 0 for c in cells}
    for row in got.token_ids:
        counts[tuple(row)] += 1
    assert chisquare([counts[c] for c in cells], [exact[c] * N / sum(exact.values()) for c in cells]).pvalue < 1e-6


def test_sampled_drafts_with_greedy_target_are_identical(models, drafts, tok, oracle):
    st = Strategy(drafter=DraftModel(model=drafts["llama"], k=3, sample=True, temperature=0.5), stop_at_eos=False)
    got = decodekit.generate(models["llama"], tok, PROMPTS, st, max_new_tokens=16, seed=0)
    assert got.token_ids == oracle("llama", PROMPTS, 16)
