"""Prompt lookup's proposal (vectorised over rows, eager or compiled) against a brute-force
search written the obvious way, on random histories over a small vocabulary (many matches, of
every n-gram size), with finished rows and rows near their budget."""

import random

import pytest
import torch

from decodekit_speculative.prompt_lookup import compiled_propose, propose


def brute(hist, length, n_new, finished, budget, ngram, min_ngram, k):
    toks, ns = [], []
    for row, L, done, used in zip(hist, length, finished, n_new):
        seq, start = row[:L], None
        for n in range(ngram, min_ngram - 1, -1):
            if L <= n:
                continue
            tail = seq[L - n:]
            hits = [j for j in range(L - n) if seq[j:j + n] == tail and j + n < L]
            if hits:
                start = hits[-1] + n  # the latest earlier occurrence
                break
        count = 0 if start is None else min(L - start, k)
        count = 0 if done else min(count, max(budget - used, 0))
        toks.append(seq[start:start + count] if start is not None else [])
        ns.append(count)
    return toks, ns


@pytest.mark.parametrize("backend", [None, "eager", "aot_eager"])
@pytest.mark.parametrize("seed", range(4))
def test_proposal_matches_brute_force(backend, seed):
    rng = random.Random(seed)
    B, W, ngram, min_ngram, k = 6, 48, 3, 1, 5
    lengths = [rng.randint(1, W) for _ in range(B)]
    rows = [[rng.randint(0, 3) for _ in range(W)] for _ in range(B)]
    finished = [rng.random() < 0.3 for _ in range(B)]
    n_new = [rng.randint(0, 12) for _ in range(B)]
    budget = 10
    args = (torch.tensor(rows), torch.tensor(lengths), torch.tensor(n_new), torch.tensor(finished), torch.tensor(budget),
            ngram, min_ngram, k)
    if backend is None:
        tokens, n = propose(*args)
    else:
        tokens, n = compiled_propose((B, W, ngram, min_ngram, k, "test"), backend)(*args)
    want_tokens, want_n = brute(rows, lengths, n_new, finished, budget, ngram, min_ngram, k)
    assert n.tolist() == want_n
    assert [tokens[r, :c].tolist() for r, c in enumerate(want_n)] == want_tokens
