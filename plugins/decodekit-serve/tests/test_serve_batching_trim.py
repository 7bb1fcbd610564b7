"""The continuous batch (decodekit.batching.Batch, the server's dynamic cache) must not keep the
columns rejected drafts leave behind: after every step the slot buffer (and with it the KV cache
and the attention width) grows by exactly the most tokens any row committed, not by the verify
width. Oracle: that count, read from the step's own accepted counts; tokens against a solo
decodekit.generate per row."""

import torch

import decodekit
from decodekit.batching import Batch, RowSpec, row_seed
from decodekit.strategy import Strategy
from decodekit.testing import tiny_model, tiny_tokenizer


def test_rejected_drafts_do_not_grow_the_dynamic_batch():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    lookup = Strategy.from_dict({"drafter": {"name": "PromptLookup", "ngram": 2, "k": 10, "fixed_width": True},
                                 "stop_at_eos": False})
    prompts = ["the cat and the cat and the cat and", "on and on and on and on and on"]
    n = 60
    b = Batch(model, tok)
    b.join([RowSpec(i, tok(p)["input_ids"], lookup, n, row_seed(0)) for i, p in enumerate(prompts)])
    proposals = 0
    while not bool(b.state.finished.all()):
        before = b.state.n_slots
        b.step()
        st = b.state
        proposals += st.proposals.shape[1]
        assert st.n_slots == before + int(st.accepted.max())
    assert proposals  # drafts were verified (and, with a tiny random model, mostly rejected)
    got = [row[:k] for row, k in zip(b.state.out_tokens.tolist(), b.state.n_new.tolist())]
    want = [decodekit.generate(model, tok, p, Strategy(stop_at_eos=False), max_new_tokens=n).token_ids[0] for p in prompts]
    assert got == want
