"""decodekit.batching (the continuous batch under the server) against oracles: transformers'
``generate`` for greedy rows, a solo ``decodekit.generate`` for seeded sampling rows (its rng is
a function of (seed, position) only, so batch company must not change a row's output)."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.batching import Batch, RowSpec, row_seed
from decodekit.plugins import get_plugin_manager
from decodekit.strategy import Strategy
from decodekit.testing import tiny_model, tiny_tokenizer

PROMPTS = ["the cat and", "hello there the one", "a", "in the end it is on", "on and on"]
MAXES = [9, 5, 12, 8, 6]


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    return out[0, ids.shape[1]:].tolist()


class Driver:
    """Runs a Batch like the scheduler does, checking the cache invariant after every step."""

    def __init__(self, model, tok):
        self.b, self.tok = Batch(model, tok), tok
        self.got: dict = {}
        self.widest = 0  # most positions verified in one step (1 + proposals)

    def spec(self, key, prompt, strategy=None, seed=0):
        return RowSpec(key, self.tok(prompt)["input_ids"], strategy or Strategy(), MAXES[key] if isinstance(key, int) else 8, row_seed(seed))

    def read(self):
        b = self.b
        out = b.poll()
        for k, (lo, toks, fin) in out.items():
            self.got[k] = self.got.get(k, [])[:lo] + toks
            assert fin == bool(b.state.finished[b.keys.index(k)])
        # The invariant: one KV row per live row, KV length == slots (committed minus each row's last).
        layers = b.cache._layers()
        assert layers[0].keys.shape[0] == len(b) == b.state.batch_size
        assert all(layer.keys.shape[2] == b.state.n_slots for layer in layers)
        assert (b.state.valid.sum(1) == b.state.committed - 1).all()
        b.remove([k for k, f in zip(b.keys, b.state.finished.tolist()) if f])

    def join(self, specs):
        self.b.join(specs)
        self.read()

    def step(self, n=1):
        for _ in range(n):
            if len(self.b):
                self.b.step()
                self.widest = max(self.widest, self.b.state.proposals.shape[1] + 1)
                self.read()

    def drain(self):
        while len(self.b):
            self.step()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_serve_batching_staggered_joins_match_transformers(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    d = Driver(model, tok)
    with torch.inference_mode():
        d.join([d.spec(0, PROMPTS[0])])
        d.step(2)
        d.join([d.spec(1, PROMPTS[1]), d.spec(2, PROMPTS[2])])  # one cohort; row 1 leaves first (a ghost)
        d.step(1)
        d.join([d.spec(3, PROMPTS[3]), d.spec(4, PROMPTS[4])])
        d.drain()
    for i, p in enumerate(PROMPTS):
        assert d.got[i] == hf_greedy(model, tok, p, MAXES[i]), f"row {i} ({p!r})"
    assert d.b.state is None and d.b.cache.allocated_bytes() == 0


def test_serve_batching_remove_frees_cache_rows():
    model, tok = tiny_model(), tiny_tokenizer()
    d = Driver(model, tok)
    with torch.inference_mode():
        d.join([d.spec(k, PROMPTS[k]) for k in (0, 2, 3)])
        before = d.b.cache.allocated_bytes()
        d.b.remove([2])  # a client hung up
        assert d.b.keys == [0, 3] and d.b.cache.allocated_bytes() < before
        d.drain()
    assert d.got[0] == hf_greedy(model, tok, PROMPTS[0], MAXES[0])
    assert d.got[3] == hf_greedy(model, tok, PROMPTS[3], MAXES[3])


def _need(*names):
    missing = [n for n in names if n not in get_plugin_manager().components]
    if missing:
        pytest.skip(f"needs components {missing} (decodekit-samplers / decodekit-speculative)")


def test_serve_batching_mixed_strategies_match_solo_generate():
    """Greedy, seeded sampling and a stateful penalty in one batch, joining at different steps:
    each row decodes exactly what it decodes alone."""
    _need("Temperature", "TopP", "Multinomial", "FrequencyPenalty")
    model, tok = tiny_model(), tiny_tokenizer()
    sampled = Strategy.from_dict({"processors": [{"name": "Temperature", "temperature": 1.3}, {"name": "TopP", "top_p": 0.9}],
                                  "sampler": "Multinomial"})
    penalised = Strategy.from_dict({"processors": [{"name": "FrequencyPenalty", "frequency_penalty": 1.5}]})
    rows = {"s1": ("the cat and", sampled, 11), "s2": ("a", sampled, 7), "p": ("on and on", penalised, 8), "g": ("hello", Strategy(), 8)}
    d = Driver(model, tok)
    with torch.inference_mode():
        d.join([RowSpec("g", tok("hello")["input_ids"], Strategy(), 8, row_seed(0))])
        d.step()
        d.join([RowSpec(k, tok(rows[k][0])["input_ids"], rows[k][1], 8, row_seed(rows[k][2])) for k in ("s1", "p")])
        d.step(2)
        d.join([RowSpec("s2", tok("a")["input_ids"], sampled, 8, row_seed(7))])
        d.drain()
    for k, (prompt, strategy, seed) in rows.items():
        solo = decodekit.generate(model, tok, prompt, strategy, max_new_tokens=8, seed=seed)
        assert d.got[k] == solo.token_ids[0], k
    assert d.got["s1"] != d.got["g"]  # sampling really happened


def test_serve_batching_drafter_rows_next_to_plain_rows():
    """A PromptLookup row (T = 1 + k) shares forwards with plain rows (padded proposals,
    n_proposed = 0); greedy with any drafter is token-identical to greedy without."""
    _need("PromptLookup")
    model, tok = tiny_model(), tiny_tokenizer()
    lookup = Strategy.from_dict({"drafter": {"name": "PromptLookup", "ngram": 2, "k": 4}})
    d = Driver(model, tok)
    prompt = "the cat and the cat and the cat and"
    with torch.inference_mode():
        d.join([RowSpec("plain", tok(PROMPTS[0])["input_ids"], Strategy(), 12, 0)])
        d.join([RowSpec("draft", tok(prompt)["input_ids"], lookup, 12, 0)])
        d.drain()
    assert d.widest > 1, "PromptLookup never proposed: the test would not exercise ragged verification"
    assert d.got["plain"] == hf_greedy(model, tok, PROMPTS[0], 12)
    assert d.got["draft"] == hf_greedy(model, tok, prompt, 12)
