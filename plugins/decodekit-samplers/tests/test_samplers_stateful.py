"""Stateful processors under speculation: at every verify position the processed scores equal a
fresh computation on that position's prefix (committed + proposals[:, :t]), and after accept /
rollback the state equals a fresh recompute.

Oracles: transformers' own processors (repetition penalty, no-repeat-ngram) called on the prefix;
the reference DRY loop of text-generation-webui (PR #5677); brute-force counts; a replay of
llama.cpp's Mirostat v2 update over the committed tokens.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers.generation import logits_process as hf

import decodekit
from decodekit import Proposal
from decodekit.loop import _apply_rollback, _commit, _trim, prepare
from decodekit.testing import tiny_model, tiny_tokenizer
import decodekit_samplers as S

PROMPTS = ["the cat and the cat and the", "he is in", "on and on and on and on at the end"]


# ------------------------------------------------------------------------------ oracles
def hf_oracle(proc):
    def oracle(seq, prompt_len, scores, history):
        return proc(torch.tensor([seq]), scores[None].clone())[0]
    return oracle


def counts_oracle(presence, frequency):
    def oracle(seq, prompt_len, scores, history):
        c = Counter(seq[prompt_len:])
        out = scores.clone()
        for tok, n in c.items():
            out[tok] -= frequency * n + presence
        return out
    return oracle


def dry_reference(multiplier, base, allowed_length, breakers, max_len=50):
    """text-generation-webui's DRYLogitsProcessor.__call__ (PR #5677) for one row."""
    def oracle(seq, prompt_len, scores, history):
        scores = scores.clone()
        last = seq[-1]
        if last in breakers:
            return scores
        match_lengths = {}
        for i in [idx for idx, v in enumerate(seq[:-1]) if v == last]:
            nxt = seq[i + 1]
            if nxt in breakers:
                continue
            m = 1
            while m < max_len:
                j = i - m
                if j < 0:
                    break
                prev = seq[-(m + 1)]
                if seq[j] != prev or prev in breakers:
                    break
                m += 1
            match_lengths[nxt] = max(m, match_lengths.get(nxt, 0))
        for tok, m in match_lengths.items():
            if m >= allowed_length:
                scores[tok] -= multiplier * base ** (m - allowed_length)
        return scores
    return oracle


def mirostat_reference(tau, eta):
    """llama.cpp llama_sampler_mirostat_v2: replay mu over the committed (scores, token) pairs."""
    def truncate(scores, mu):
        logp = torch.log_softmax(scores.double(), -1)
        drop = -logp / math.log(2) > mu
        drop[logp.argmax()] = False
        return drop, torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)

    def oracle(seq, prompt_len, scores, history):
        mu = 2 * tau
        for s, tok in history:
            _, lp = truncate(s, mu)
            mu -= eta * (-lp[tok].item() / math.log(2) - tau)
        drop, _ = truncate(scores, mu)
        return scores.masked_fill(drop, float("-inf"))
    return oracle


CASES = {
    "repetition": (lambda: S.RepetitionPenalty([1.3, 0.8, 2.0]), lambda r: hf_oracle(hf.RepetitionPenaltyLogitsProcessor([1.3, 0.8, 2.0][r]))),
    "no_repeat_2": (lambda: S.NoRepeatNGram(2), lambda r: hf_oracle(hf.NoRepeatNGramLogitsProcessor(2))),
    "no_repeat_3": (lambda: S.NoRepeatNGram(3), lambda r: hf_oracle(hf.NoRepeatNGramLogitsProcessor(3))),
    "presence": (lambda: S.PresencePenalty([0.5, 1.0, -0.5]), lambda r: counts_oracle([0.5, 1.0, -0.5][r], 0.0)),
    "frequency": (lambda: S.FrequencyPenalty(0.7), lambda r: counts_oracle(0.0, 0.7)),
    "dry": (lambda: S.DRY(multiplier=0.8, base=1.75, allowed_length=2, sequence_breakers=[5, 9]),
            lambda r: dry_reference(0.8, 1.75, 2, {5, 9})),
    "mirostat": (lambda: S.Mirostat(tau=[3.0, 5.0, 7.0], eta=0.2), lambda r: mirostat_reference([3.0, 5.0, 7.0][r], 0.2)),
}


def committed_seq(state, r):
    n = int(state.n_new[r])
    return state.prompt_ids[r] + state.out_tokens[r, :n].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_handmade_proposals_match_fresh_oracle(case):
    make, make_oracle = CASES[case]
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    state, _ = prepare(model, tok, PROMPTS, None, max_new_tokens=24, seed=0)
    B, V, k = state.batch_size, state.vocab_size, 3
    comp = make()
    comp.setup(state)
    oracles = [make_oracle(r) for r in range(B)]
    history = [[] for _ in range(B)]  # per row: (scores, token) of every committed new token
    state.out_tokens = torch.zeros(B, state.max_new_tokens + k + 1, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    vocab = torch.tensor(tok("the cat and on at end")["input_ids"] + [5, 9])  # few ids: repeats happen
    for step in range(7):
        T = 1 + (k if step % 3 != 2 else 0)  # some steps verify without proposals
        proposals = vocab[torch.randint(len(vocab), (B, T - 1), generator=g)]
        scores = torch.randn(B, T, V, generator=g)
        for t in range(T - 1):  # proposals are likely under the scores (Mirostat keeps them)
            scores[torch.arange(B), t, proposals[:, t]] += 4.0
        state.proposals = proposals
        state.proposal = Proposal(proposals) if T > 1 else None
        state.n_proposed = torch.full((B,), T - 1)
        state.scores = scores.clone()
        out = comp.process_logits(state)
        out = state.scores if out is None else out
        for r in range(B):
            seq = committed_seq(state, r)
            for t in range(T):
                prefix = seq + proposals[r, :t].tolist()
                hist = history[r] + [(scores[r, j], int(proposals[r, j])) for j in range(t)]
                want = oracles[r](prefix, len(state.prompt_ids[r]), scores[r, t], hist).float()
                torch.testing.assert_close(out[r, t], want, rtol=1e-5, atol=1e-5, msg=f"{case} step {step} row {r} t {t}")
        # commit a ragged number of proposals per row, then the top token of the processed scores
        n = torch.randint(0, T, (B,), generator=g)
        nxt = out.argmax(-1).gather(1, n[:, None])[:, 0]
        inputs = torch.cat([state.last[:, None], proposals], 1)
        _commit(state, inputs, n, nxt)
        for r in range(B):
            for t in range(int(state.accepted[r])):
                history[r].append((scores[r, t], int(state.step_tokens[r, t])))
        comp.accept(state)
        if step in (2, 4):  # a component asks to un-commit 1..3 tokens
            m = torch.minimum(torch.tensor([2, 1, 3]), state.n_new)
            _apply_rollback(state, m)
            for r in range(B):
                del history[r][len(history[r]) - int(m[r]):]
            comp.accept(state)
        _trim(state)
        _check_state_is_fresh(comp, state)


def _check_state_is_fresh(comp, state):
    """Internal state equals a recompute from the committed tokens."""
    for r in range(state.batch_size):
        seq = committed_seq(state, r)
        if hasattr(comp, "_hist"):
            h = comp._hist
            assert int(h.length[r]) == len(seq)
            assert h.ids[r, : len(seq)].tolist() == seq
        if hasattr(comp, "committed_counts"):
            counted = seq if comp.include_prompt else seq[len(state.prompt_ids[r]):]
            fresh = torch.zeros(state.vocab_size)
            for tok, c in Counter(counted).items():
                fresh[tok] = c
            assert torch.equal(comp.committed_counts(state)[r, : state.vocab_size], fresh)


# ------------------------------------------------------------------------------ through the loop
class ScriptedDrafter(decodekit.Drafter):
    """Proposes the next tokens of a reference output, corrupted at some positions, with ragged
    lengths per row: some proposals are accepted, some rejected."""

    k: int = 3
    reference: list[list[int]]

    def pre_logits(self, state):
        B = state.batch_size
        n_new = state.n_new.tolist()
        rows = []
        for r in range(B):
            ref = self.reference[r][n_new[r]: n_new[r] + self.k]
            ref = ref + [7] * (self.k - len(ref))
            if (state.step + r) % 3 == 1:
                ref[(state.step + r) % self.k] = 11  # corrupt one proposal
            rows.append(ref)
        lengths = torch.tensor([self.k - (state.step + r) % 2 for r in range(B)])
        return Proposal(torch.tensor(rows), lengths=lengths)


class RollbackOnce(decodekit.Processor):
    """Asks the host to un-commit the last tokens once, at a given step."""

    at_step: int = 3
    counts: list[int] = [2, 1, 3]

    def setup(self, state):
        self._done = False

    def process_logits(self, state):
        return None

    def accept(self, state):
        if state.step == self.at_step and not self._done:
            self._done = True
            state.request_rollback(torch.tensor(self.counts))


def chain():
    return [S.RepetitionPenalty(1.3), S.FrequencyPenalty(0.3), S.PresencePenalty(0.2), S.NoRepeatNGram(3),
            S.DRY(multiplier=1.0, sequence_breakers=[5]), S.Temperature([0.8, 1.0, 1.2]), S.TopK(40), S.TopP(0.95),
            S.Mirostat(tau=4.0)]


@pytest.mark.parametrize("sampler", ["Greedy", "Multinomial"])
def test_speculation_and_rollback_do_not_change_the_output(sampler):
    """With deterministic drafts verification is exact, and Multinomial draws position-keyed noise:
    so with every stateful processor in the chain, a drafted run with a rollback in the middle must
    produce the very tokens of a plain run. Any stale or mis-rolled-back state changes them."""
    tok, model = tiny_tokenizer(), tiny_model("llama")
    kw = dict(max_new_tokens=20, seed=[3, 4, 5])
    plain = decodekit.generate(model, tok, PROMPTS, decodekit.Strategy(processors=chain(), sampler=sampler), **kw)
    drafted = decodekit.generate(
        model, tok, PROMPTS,
        decodekit.Strategy(processors=chain() + [RollbackOnce()], sampler=sampler,
                           drafter=ScriptedDrafter(reference=plain.token_ids)),
        **kw,
    )
    assert drafted.stats["forward_passes"] < plain.stats["forward_passes"]  # drafts were accepted
    assert drafted.token_ids == plain.token_ids


# ------------------------------------------------------------------------------ host work per step
COUNTING = [lambda: S.RepetitionPenalty(1.3), lambda: S.PresencePenalty(0.5), lambda: S.FrequencyPenalty(0.7)]


def _loop_state(B: int = 3, max_new: int = 12, width: int | None = None):
    tok, model = tiny_tokenizer(), tiny_model("llama")
    state, _ = prepare(model, tok, PROMPTS[:B], None, max_new_tokens=max_new, seed=0)
    # The loop allocates max_new_tokens + k + 1 columns; other drivers may use another width.
    state.out_tokens = torch.zeros(state.batch_size, width or max_new + 1, dtype=torch.long)
    state.proposals = torch.zeros(state.batch_size, 0, dtype=torch.long)
    state.n_proposed = torch.zeros(state.batch_size, dtype=torch.long)
    return state


@pytest.mark.parametrize("width,ops_per_accept", [(None, ["slice", "copy_"]), (64, [])], ids=["mirrored", "direct"])
@pytest.mark.parametrize("make", COUNTING, ids=["repetition", "presence", "frequency"])
def test_counting_accept_launches_at_most_one_copy(make, width, ops_per_accept):
    """The counting penalties' per-token host work is one copy, none when ``out_tokens``' width is
    already a bucket (issue #4: on a GPU at batch 1 every eager op in an accept hook is a kernel
    launch outside the CUDA graph). Counted with a dispatch mode: every ATen call accept makes,
    views included; the counts must still equal a fresh recompute."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    state = _loop_state(width=width)
    comp = make()
    comp.setup(state)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        state.scores = torch.randn(state.batch_size, 1, state.vocab_size, generator=g)
        nxt = comp.process_logits(state).argmax(-1)[:, 0]
        _commit(state, torch.cat([state.last[:, None], state.proposals], 1), state.n_proposed, nxt)
        with Ops() as ops:
            comp.accept(state)
        assert [op.split(".")[0] for op in ops.ops] == ops_per_accept, ops.ops
        _check_state_is_fresh(comp, state)


def test_counting_follows_a_wider_out_tokens():
    """A driver may replace ``out_tokens`` by a wider tensor mid-generation (the transformers
    adapter grows it): the counts still equal a fresh recompute, before and after."""
    state = _loop_state(max_new=70)
    comp = S.FrequencyPenalty(0.7, include_prompt=True)
    comp.setup(state)
    g = torch.Generator().manual_seed(1)
    for step in range(70):
        if step == 40:  # past the first mirror width (64): the mirror must grow
            state.out_tokens = torch.cat([state.out_tokens, torch.zeros_like(state.out_tokens)], 1)
        scores = torch.randn(state.batch_size, 1, state.vocab_size, generator=g)
        state.scores = scores.clone()
        out = comp.process_logits(state)
        for r in range(state.batch_size):  # FrequencyPenalty over prompt + new tokens
            want = counts_oracle(0.0, 0.7)(committed_seq(state, r), 0, scores[r, 0], None)
            torch.testing.assert_close(out[r, 0], want, rtol=1e-5, atol=1e-5)
        nxt = (out[:, 0] + 3 * torch.randn(out[:, 0].shape, generator=g)).argmax(-1)
        _commit(state, torch.cat([state.last[:, None], state.proposals], 1), state.n_proposed, nxt)
        comp.accept(state)
        _check_state_is_fresh(comp, state)
