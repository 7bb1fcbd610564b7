"""The compiled path's verify + commit (decodekit.loop._spec_math, run through torch.compile on a
compiled cache) against the eager verify() + _commit() it replaces: random states with finished
rows, EOS ids inside and after the accepted drafts, rows at their budget, one or several EOS ids,
batch 1 and 5. Every state field a component can read must come out equal."""

import pytest
import torch

from decodekit.loop import _commit, _commit_compiled, _spec_fn, _spec_math
from decodekit.state import DecodeState, Proposal
from decodekit.verify import verify


def make_state(seed, B, T, eos):
    g = torch.Generator().manual_seed(seed)
    V, P, max_new = 6, 4, 9
    st = DecodeState(model=None, tokenizer=None, device=torch.device("cpu"), batch_size=B, vocab_size=V,
                     prompt_ids=[[1] * P] * B, prompt_lengths=torch.full((B,), P), seeds=torch.zeros(B, dtype=torch.long),
                     max_new_tokens=max_new, eos_token_ids=torch.tensor(eos, dtype=torch.long), pad_token_id=0)
    st.tokens = torch.randint(0, V, (B, P + 3), generator=g)
    st.valid = torch.rand(B, P + 3, generator=g) < 0.8
    st.last = torch.randint(0, V, (B,), generator=g)
    st.n_new = torch.randint(0, max_new, (B,), generator=g)
    st.committed = st.n_new + P
    st.finished = torch.rand(B, generator=g) < 0.25
    st.out_tokens = torch.randint(0, V, (B, max_new + T + 1), generator=g)
    st.proposals = torch.randint(0, V, (B, T - 1), generator=g)
    st.n_proposed = torch.randint(0, T, (B,), generator=g).masked_fill(st.finished, 0)
    target = torch.where(torch.rand(B, T, generator=g) < 0.6, torch.cat([st.proposals, st.last[:, None]], 1),
                         torch.randint(0, V, (B, T), generator=g))  # agrees with the drafts often
    return st, target


FIELDS = ["tokens", "valid", "last", "committed", "n_new", "finished", "out_tokens", "step_tokens", "accepted",
          "n_matched", "rolled_back"]


@pytest.mark.parametrize("eos", [[], [2], [2, 5]])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("compiled", [False, True])
def test_spec_math_equals_verify_and_commit(seed, B, eos, compiled):
    T = 4
    a, target = make_state(seed, B, T, eos)
    b, _ = make_state(seed, B, T, eos)
    inputs = torch.cat([a.last[:, None], a.proposals], 1)
    # eager: the loop's own path
    prop = Proposal(tokens=a.proposals, lengths=a.n_proposed)
    n, nxt = verify(a, target, None, prop)
    n = n.masked_fill(a.finished, 0)
    a.n_matched = n
    _commit(a, inputs, n, nxt)
    # the function the compiled path runs
    fn = _spec_fn(B, T, "eager") if compiled else _spec_math
    drafted, matched = _commit_compiled(b, inputs.clone(), target, fn, torch.tensor(b.max_new_tokens))
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if f == "step_tokens":  # beyond a row's count nothing is read (accept hooks use accepted)
            keep = torch.arange(T)[None] < a.accepted[:, None]
            x, y = x.masked_fill(~keep, 0), y.masked_fill(~keep, 0)
        assert torch.equal(x, y), f
    assert int(drafted) == int(b.n_proposed.sum()) and int(matched) == int(n.sum())
