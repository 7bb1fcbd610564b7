"""decodekit_serve.static (the server's static KV cache) against oracles: transformers ``generate``
for greedy rows and a solo ``decodekit.generate`` for seeded sampling / stateful / drafter rows.
Rows join while others decode, leave, and reuse freed batch slots; columns run out and compact."""

from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.batching import RowSpec, row_seed
from decodekit.errors import DecodekitError
from decodekit.plugins import get_plugin_manager
from decodekit.strategy import Strategy
from decodekit.testing import tiny_model, tiny_tokenizer
from decodekit_kvcache.layout import kv_bytes, layout_from_config
from decodekit_serve.static import StaticBatch

# The eager step, and the compiled step (the CUDA default) traced on CPU with torch.compile's
# aot_eager backend: the same graph capture, fixed shapes and buffers, no code generation.
MODES = {"eager": {}, "compiled": {"compile": True, "compile_backend": "aot_eager"}}
PROMPTS = ["the cat and", "hello there the one", "a", "in the end it is on", "on and on", "it is the", "at the end"]
MAXES = [9, 5, 12, 8, 6, 10, 7]


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    return out[0, ids.shape[1]:].tolist()


class Driver:
    """Runs a StaticBatch like the scheduler does, checking its invariants after every step."""

    def __init__(self, model, tok, **kw):
        self.b, self.tok = StaticBatch(model, tok, **kw), tok
        self.bytes = self.b.cache.allocated_bytes()
        self.got: dict = {}
        self.slots: dict = {}  # key -> batch slot it was placed in
        self.widest = 1

    def read(self):
        b = self.b
        out = b.poll()  # the scheduler's one read per step
        for k, (lo, toks, fin) in out.items():
            self.got[k] = self.got.get(k, [])[:lo] + toks
            assert fin == bool(b.state.finished[b.keys.index(k)])
        assert set(out) == {k for k in b.keys if k is not None}
        st = b.state
        live = torch.tensor([k is not None for k in b.keys])
        # The core's invariant on live rows: valid slots == committed minus the last; free slots hold none.
        assert (st.valid.sum(1)[live] == st.committed[live] - 1).all()
        assert not st.valid[~live].any() and st.finished[~live].all()
        assert st.batch_size == b.max_batch and st.n_slots <= b.max_len
        assert b.cache.allocated_bytes() == self.bytes  # nothing allocated per step or per request
        for r, k in enumerate(b.keys):
            if k is not None:
                self.slots.setdefault(k, r)
        b.remove([k for k, f in zip(b.keys, st.finished.tolist()) if k is not None and f])

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

    def check_mode(self, mode):
        stats = self.b.cache.stats
        if mode == "compiled":  # every decode step ran compiled (prefills are eager, in their own batch)
            assert stats["compiled_steps"] > 0 and stats["eager_steps"] == 0 and "compile_fallback" not in stats, stats
        else:
            assert stats["compiled_steps"] == 0 and stats["eager_steps"] > 0, stats


def spec(tok, key, strategy=None, seed=0, max_new=None):
    return RowSpec(key, tok(PROMPTS[key % len(PROMPTS)])["input_ids"], strategy or Strategy(),
                   max_new or MAXES[key % len(MAXES)], row_seed(seed))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_serve_static_staggered_joins_reuse_slots_and_compact(arch, mode):
    """Eight requests through three batch slots with max_len=18: rows join while others decode,
    freed slots are reused, the columns run out and compact; every row equals transformers' greedy
    (mistral/gemma3: sliding window 8, crossed by every row)."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    d = Driver(model, tok, max_batch=3, max_len=18, **MODES[mode])
    with torch.inference_mode():
        d.join([spec(tok, 0)])
        d.step(2)
        d.join([spec(tok, 1), spec(tok, 2)])  # one cohort; row 1 leaves first (a ghost)
        d.step(1)
        for key in range(3, 8):
            while len(d.b) == d.b.max_batch:
                d.step()
            d.join([spec(tok, key)])
            d.step(1)
        d.drain()
    for key in range(8):
        assert d.got[key] == hf_greedy(model, tok, PROMPTS[key % len(PROMPTS)], MAXES[key % len(MAXES)]), f"row {key}"
    assert d.b.compactions >= 1, "the columns never ran out: the test does not exercise compaction"
    assert set(d.slots.values()) == {0, 1, 2} and len(d.slots) == 8  # slots were reused
    assert len(d.b) == 0 and d.b.state.n_slots == 0
    d.check_mode(mode)


def _need(*names):
    missing = [n for n in names if n not in get_plugin_manager().components]
    if missing:
        pytest.skip(f"needs components {missing} (decodekit-samplers / decodekit-speculative)")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_serve_static_mixed_strategies_match_solo_generate(arch, mode):
    """Seeded sampling, a stateful penalty, a PromptLookup drafter (T = 1 + k, ragged acceptance)
    and greedy rows in one static batch, joining at different steps, with compaction: each row
    decodes exactly what it decodes alone."""
    _need("Temperature", "TopP", "Multinomial", "FrequencyPenalty", "PromptLookup")
    model, tok = tiny_model(arch), tiny_tokenizer()
    sampled = Strategy.from_dict({"processors": [{"name": "Temperature", "temperature": 1.3}, {"name": "TopP", "top_p": 0.9}],
                                  "sampler": "Multinomial"})
    penalised = Strategy.from_dict({"processors": [{"name": "FrequencyPenalty", "frequency_penalty": 1.5}]})
    lookup = Strategy.from_dict({"drafter": {"name": "PromptLookup", "ngram": 2, "k": 3}})
    rows = {"s1": ("the cat and", sampled, 11), "s2": ("a", sampled, 7), "p": ("on and on", penalised, 8),
            "g": ("hello", Strategy(), 8), "d": ("the cat and the cat and the cat and", lookup, 0)}
    d = Driver(model, tok, max_batch=4, max_len=34, **MODES[mode])

    def row(k):
        prompt, strategy, seed = rows[k]
        return RowSpec(k, tok(prompt)["input_ids"], strategy, 10, row_seed(seed))

    with torch.inference_mode():
        d.join([row("g")])
        d.step()
        d.join([row("s1"), row("p")])
        d.step(2)
        d.join([row("d")])
        d.step(3)
        while len(d.b) == d.b.max_batch:  # the fifth row waits for a free slot
            d.step()
        d.join([row("s2")])
        d.drain()
    for k, (prompt, strategy, seed) in rows.items():
        solo = decodekit.generate(model, tok, prompt, strategy, max_new_tokens=10, seed=seed)
        assert d.got[k] == solo.token_ids[0], k
    assert d.widest > 1, "PromptLookup never proposed: ragged verification not exercised"
    assert d.got["s1"] != d.got["g"]  # sampling really happened
    assert d.b.compactions >= 1
    d.check_mode(mode)


def test_serve_static_memory_is_preallocated_and_requests_that_cannot_fit_are_refused():
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    b = StaticBatch(model, tok, max_batch=3, max_len=20, max_depth=4)
    layout = layout_from_config(model.config)
    # The store is exactly decodekit-kvcache's estimate: 3 x 20 full slots, rings of window + depth + 1.
    assert b.cache.allocated_bytes() == kv_bytes(layout, 3, 20, 4, 4)["total"] > 0
    with torch.inference_mode():
        with pytest.raises(DecodekitError, match=r"max_len|--max-len"):
            b.join([RowSpec("long", tok("the cat and")["input_ids"], Strategy(), 18, 0)])
        assert len(b) == 0 and b.state.n_slots == 0  # refused before anything changed
        b.join([RowSpec("ok", tok("the cat and")["input_ids"], Strategy(), 12, 0)])
        with pytest.raises(DecodekitError, match="batch slots are free"):
            b.join([RowSpec(i, tok("a")["input_ids"], Strategy(), 3, 0) for i in range(3)])
        assert b.keys.count(None) == 2


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_serve_static_rollback_rows_match_solo_generate(arch, mode):
    """BannedWords in rollback mode un-commits tokens (request_rollback) next to a greedy row:
    the static batch (rings on gemma3) decodes what a solo generate with a deep enough cache does."""
    _need("BannedWords")
    model, tok = tiny_model(arch), tiny_tokenizer()
    plain = decodekit.generate(model, tok, "the cat and", Strategy(), max_new_tokens=14).texts[0]
    word = plain.strip()[:3]  # a piece of what greedy writes: the ban must roll it back
    banned = [{"name": "BannedWords", "words": [word], "mode": "rollback"}]
    d = Driver(model, tok, max_batch=3, max_len=40, max_depth=16, **MODES[mode])
    with torch.inference_mode():
        d.join([RowSpec("g", tok("hello there")["input_ids"], Strategy(), 14, 0)])
        d.step(2)
        d.join([RowSpec("b", tok("the cat and")["input_ids"], Strategy.from_dict({"processors": banned}), 14, 0)])
        d.drain()
    solo = decodekit.generate(model, tok, "the cat and", {"cache": {"name": "DynamicCache", "max_rollback": 16}, "processors": banned},
                              max_new_tokens=14)
    assert solo.texts[0] != plain and word not in solo.texts[0]  # the ban really acted
    assert d.got["b"] == solo.token_ids[0]
    assert d.got["g"] == hf_greedy(model, tok, "hello there", 14)
    d.check_mode(mode)


def test_serve_static_compile_error_falls_back_to_the_eager_step():
    """A compiler that fails (here a torch.compile backend that raises, as Inductor's codegen once did
    on an H200) costs no request: the static step falls back to the eager forward, says so in its
    stats and a warning, and every row still equals transformers' greedy."""
    import torch._dynamo

    name = "decodekit_test_broken"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        def broken(gm, example_inputs):
            raise RuntimeError("code generation failed (a test backend)")

        torch._dynamo.register_backend(broken, name)
    model, tok = tiny_model(), tiny_tokenizer()
    d = Driver(model, tok, max_batch=3, max_len=30, compile=True, compile_backend=name)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="eager"):
        d.join([spec(tok, 0), spec(tok, 1)])
        d.step(2)
        d.join([spec(tok, 2)])
        d.drain()
    for key in range(3):
        assert d.got[key] == hf_greedy(model, tok, PROMPTS[key], MAXES[key]), f"row {key}"
    stats = d.b.cache.stats
    assert not stats["compiled"] and "code generation failed" in stats["compile_fallback"]
    assert stats["compiled_steps"] == 0 and stats["eager_steps"] > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_serve_static_step_and_poll_sync_once_per_step(mode, monkeypatch):
    """The scheduler's step + poll with greedy and sampling cohorts reads the device once per step:
    poll's single ``.tolist()``, and no scalar (``.item()``/``bool()``/``int()`` all dispatch
    ``_local_scalar_dense``, a host sync on a GPU). A join or a leave may sync; a step may not."""
    _need("Temperature", "TopP", "Multinomial")
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ScalarReads.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    model, tok = tiny_model(), tiny_tokenizer()
    sampled = Strategy.from_dict({"processors": [{"name": "Temperature", "temperature": 0.8}, {"name": "TopP", "top_p": 0.9}],
                                  "sampler": "Multinomial"})
    b = StaticBatch(model, tok, max_batch=4, max_len=64, **MODES[mode])
    got: dict = {}
    tolist = torch.Tensor.tolist
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or tolist(t))
    with torch.inference_mode():
        b.join([spec(tok, 0, max_new=12)])
        b.join([spec(tok, 1, sampled, seed=3, max_new=12), spec(tok, 2, sampled, seed=4, max_new=12)])
        for k, (lo, toks, _) in b.poll().items():
            got[k] = toks
        calls.clear()
        with ScalarReads():
            for _ in range(6):
                b.step()
                for k, (lo, toks, _) in b.poll().items():
                    got[k] = got[k][:lo] + toks
    assert ScalarReads.n == 0 and len(calls) == 6, calls
    assert all(len(t) == 7 for t in got.values())  # the prefill's token and six steps' were all read
