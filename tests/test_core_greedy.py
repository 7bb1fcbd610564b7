"""decodekit greedy is token-identical to transformers' greedy generate (fp32)."""

import pytest
import torch

import decodekit
from decodekit import Drafter, NoCache, Proposal, Strategy
from decodekit.testing import hf_dynamic_cache_component, hf_greedy

PROMPTS = ["the cat sat on", "a", "hello there, and the other one is", "on the"]


HFDynamic = hf_dynamic_cache_component()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cache", [NoCache, HFDynamic])
def test_greedy_matches_transformers(arch_model, tok, batch, cache):
    arch, model = arch_model
    prompts = PROMPTS[:batch]
    n = 20  # longer than the sliding window (8) of the tiny mistral/gemma3
    got = decodekit.generate(model, tok, prompts, Strategy(cache=cache(), stop_at_eos=False), max_new_tokens=n)
    assert got.token_ids == hf_greedy(model, tok, prompts, n)
    assert got.stats["new_tokens"] == n * batch
    assert got.stats["forward_passes"] == n


class Oracle(Drafter):
    """Proposes k tokens: the first `good` are the true greedy continuation (from a precomputed
    oracle), the rest are wrong — so every acceptance length 0..k happens."""

    k: int = 3
    truth: list = []
    good: list = []

    def pre_logits(self, state):
        B, k = state.batch_size, self.k
        done = state.n_new.tolist()
        toks = torch.zeros(B, k, dtype=torch.long)
        for r in range(B):
            g = self.good[(state.step + r) % len(self.good)]
            for j in range(k):
                i = done[r] + j  # position 0 predicts new token done[r]: the drafts guess it and on
                true = self.truth[r][i] if i < len(self.truth[r]) else 5
                toks[r, j] = true if j < g else (true + 1) % 300 + 3
        return Proposal(tokens=toks)


@pytest.mark.parametrize("cache", [NoCache, HFDynamic])
def test_ragged_acceptance_is_lossless_and_keeps_invariants(tok, cache):
    from decodekit.testing import tiny_model

    model = tiny_model("llama", seed=3)
    prompts = PROMPTS
    n = 16
    truth = hf_greedy(model, tok, prompts, n + 8)
    drafter = Oracle(k=3, truth=truth, good=[0, 3, 1, 2, 3, 0])
    seen = []

    class Watch(decodekit.Processor):
        def process_logits(self, state):
            # Invariant: valid slots per row == committed - 1, and the slot tokens are the committed prefix.
            assert state.valid.sum(1).tolist() == (state.committed - 1).tolist()
            ids = state.committed_ids(with_last=False)
            for r in range(state.batch_size):
                c = int(state.committed[r]) - 1
                row = ids[r, ids.shape[1] - c:].tolist()
                prompt = state.prompt_ids[r]
                expect = (prompt + truth[r])[:c]
                assert row == expect
            seen.append(state.proposals.shape[1])

    st = Strategy(cache=cache(), drafter=drafter, processors=[Watch()], stop_at_eos=False)
    got = decodekit.generate(model, tok, prompts, st, max_new_tokens=n)
    assert got.token_ids == [t[:n] for t in truth]
    assert got.stats["forward_passes"] < n  # some proposals were accepted
    assert 0 < got.stats["acceptance_rate"] < 1
    assert set(seen) == {3}


def test_finished_rows_never_change(tok):
    from decodekit.testing import tiny_model

    model = tiny_model("llama", seed=3)
    # Stop early on one row via a stop string; the others continue.
    free = decodekit.generate(model, tok, PROMPTS, Strategy(cache=NoCache(), stop_at_eos=False), max_new_tokens=12)
    text0 = free.texts[0]
    # A stop string whose first occurrence is in the middle of row 0's text.
    p = next(p for p in range(2, len(text0) - 2) if text0.find(text0[p:p + 2]) == p)
    stop = text0[p:p + 2]
    got = decodekit.generate(model, tok, PROMPTS, Strategy(cache=NoCache(), stop_at_eos=False, stop=[stop]), max_new_tokens=12)
    assert got.texts[0] == text0[: text0.find(stop)]
    assert got.finish_reasons[0] == "stop"
    for r in range(1, 4):
        if stop not in free.texts[r]:
            assert got.token_ids[r] == free.token_ids[r]
            assert got.finish_reasons[r] == "length"


def test_eos_finishes_a_row(tok):
    from decodekit.testing import tiny_model

    model = tiny_model("llama", seed=2)
    free = decodekit.generate(model, tok, PROMPTS[:2], Strategy(cache=NoCache(), stop_at_eos=False), max_new_tokens=10)
    # Declare the 4th generated token of row 0 an EOS token: row 0 must stop right after it.
    eos = free.token_ids[0][3]
    model.generation_config.eos_token_id = eos
    try:
        got = decodekit.generate(model, tok, PROMPTS[:2], Strategy(cache=NoCache()), max_new_tokens=10)
    finally:
        model.generation_config.eos_token_id = 2
    first = free.token_ids[0].index(eos)
    assert got.token_ids[0] == free.token_ids[0][: first + 1]
    assert got.finish_reasons[0] == "eos"
    if eos not in free.token_ids[1]:
        assert got.token_ids[1] == free.token_ids[1]


def test_seeded_sampling_is_reproducible_and_batch_independent(tok):
    """A minimal sampler through the public Sampler API: per-row streams from decodekit.rng."""
    from decodekit import Sampler, rng
    from decodekit.testing import tiny_model

    class Sample(Sampler):
        def sample(self, state):
            T = state.scores.shape[1]
            pos = state.committed[:, None] + torch.arange(T)
            return rng.sample(state.scores / 2.0, state.seeds, pos), torch.softmax(state.scores / 2.0, -1)

    model = tiny_model("llama", seed=0)
    st = Strategy(cache=NoCache(), sampler=Sample(), stop_at_eos=False)
    a = decodekit.generate(model, tok, PROMPTS[:1], st, max_new_tokens=12, seed=[11])
    b = decodekit.generate(model, tok, [PROMPTS[0], PROMPTS[2]], st, max_new_tokens=12, seed=[11, 5])
    c = decodekit.generate(model, tok, PROMPTS[:1], st, max_new_tokens=12, seed=[12])
    assert a.token_ids[0] == b.token_ids[0]
    assert a.token_ids[0] != c.token_ids[0]
    greedy = decodekit.generate(model, tok, PROMPTS[:1], Strategy(cache=NoCache(), stop_at_eos=False), max_new_tokens=12)
    assert a.token_ids[0] != greedy.token_ids[0]


def test_decoding_builds_no_autograd_graph_and_leaves_grad_mode(tok):
    from decodekit.testing import tiny_model

    model = tiny_model("llama")
    seen = []

    class Probe(decodekit.Processor):
        def process_logits(self, state):
            seen.append((torch.is_grad_enabled(), state.scores.requires_grad))

    assert torch.is_grad_enabled()
    it = decodekit.stream(model, tok, "the cat", Strategy(processors=[Probe()], stop_at_eos=False), max_new_tokens=3)
    next(it)
    assert torch.is_grad_enabled()  # the caller's mode between yields
    list(it)
    assert seen == [(False, False)] * 3


def test_stop_check_read_one_step_late_changes_nothing(tok, monkeypatch):
    """On CUDA the all-finished flag is read one step late (no host sync per step). Forced on here:
    the tokens must equal the synchronous loop's, with at most one extra (empty) step."""
    from decodekit import loop
    from decodekit.testing import tiny_model

    model = tiny_model("llama", seed=1)
    ref = hf_greedy(model, tok, PROMPTS, 12)
    eos = ref[0][3]  # row 0 stops early; the others run on
    s = Strategy(cache=HFDynamic(), eos_token_ids=[eos])
    sync = decodekit.generate(model, tok, PROMPTS, s, max_new_tokens=12)
    monkeypatch.setattr(loop._StopCheck, "lags", staticmethod(lambda device: True))
    late = decodekit.generate(model, tok, PROMPTS, s, max_new_tokens=12)
    assert late.token_ids == sync.token_ids == [r[: r.index(eos) + 1] if eos in r else r for r in ref]
    assert sync.stats["forward_passes"] <= late.stats["forward_passes"] <= sync.stats["forward_passes"] + 1
