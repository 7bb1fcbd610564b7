"""A live decodekit server on 127.0.0.1 with the static KV cache (``cache="static"``), over real HTTP.
Oracles: transformers ``generate`` (greedy) and a solo ``decodekit.generate`` (seeded sampling,
``stop_at_eos=False``) — never the server's own output. Llama (full attention) and Gemma-3 (hybrid
sliding window 8 / full layers)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

import decodekit
from decodekit.plugins import get_plugin_manager
from decodekit.testing import tiny_model, tiny_tokenizer
from decodekit_serve import create_app, running
from decodekit_serve.static import StaticBatch, StaticBatchCache

MODEL = "tiny"
MAX_LEN = 256


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def served(request):
    model, tok = tiny_model(request.param), tiny_tokenizer()
    app = create_app(model, tok, model_id=MODEL, max_batch=4, cache="static", max_len=MAX_LEN)
    assert isinstance(app.state.scheduler.batch, StaticBatch)
    with running(app) as url:
        yield url, app.state.scheduler, model, tok


def hf(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=2)
    return out[0, len(ids):].tolist()


def text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def sse_text(resp: httpx.Response) -> str:
    events = [line[len("data: "):] for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


def wait_until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _has(*names):
    return all(n in get_plugin_manager().components for n in names)


def test_serve_static_concurrent_and_joining_requests_match_oracles(served):
    """Streaming requests started a little apart (each joins while the others decode) plus a seeded
    sampling request: each gets exactly what it gets alone."""
    url, sched, model, tok = served
    prompts = ["the cat and", "a", "in the end it is on", "hello there the one", "on and on"]
    maxes = [40, 25, 30, 20, 35]
    results: dict[int, str] = {}
    sched.stats["max_rows"] = 0
    joined = sched.stats["joined"]

    def one(i, extra=None):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": maxes[i], "stream": True, **(extra or {})}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            results[i] = sse_text(r)

    sampling = {"temperature": 1.1, "seed": 5} if _has("Temperature", "Multinomial") else None
    threads = [threading.Thread(target=one, args=(i, sampling if i == 4 else None)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.03)  # stagger: later requests join a running batch
    for t in threads:
        t.join(120)
    assert sched.stats["joined"] == joined + 5
    assert sched.stats["max_rows"] >= 2, "the requests were serialised, never batched"
    for i in range(4):
        assert results[i] == text(tok, hf(model, tok(prompts[i])["input_ids"], maxes[i])), i
    if sampling:
        strategy = {"processors": [{"name": "Temperature", "temperature": 1.1}], "sampler": "Multinomial"}
        want = decodekit.generate(model, tok, prompts[4], strategy, max_new_tokens=maxes[4], seed=5).texts[0]
    else:
        want = text(tok, hf(model, tok(prompts[4])["input_ids"], maxes[4]))
    assert results[4] == want


def test_serve_static_disconnect_frees_the_slot_and_the_next_request_reuses_it(served, monkeypatch):
    """A (slot 0) and B (slot 1) decode; A's client hangs up; C then joins while B decodes and
    takes slot 0, over A's stale KV. C and B still equal their oracles. The scheduler is held
    between steps by a gate so the sequence does not depend on the machine's speed."""
    url, sched, model, tok = served
    placed: list[list[int]] = []
    gate = threading.Event()
    gate.set()
    write_rows, step = StaticBatchCache.write_rows, StaticBatch.step

    def record(self, rows, *args, **kw):  # observes where joiners land, then does the real write
        placed.append(rows.tolist())
        return write_rows(self, rows, *args, **kw)

    def gated(self):  # the real step, run only while the gate is open
        gate.wait()
        return step(self)

    monkeypatch.setattr(StaticBatchCache, "write_rows", record)
    monkeypatch.setattr(StaticBatch, "step", gated)
    long = {"model": MODEL, "max_tokens": 220, "stream": True, "decodekit": {"stop_at_eos": False}}
    kv_bytes = sched.batch.cache.allocated_bytes()
    out: dict[str, str] = {}

    def run_b():
        with httpx.Client(base_url=url, timeout=60) as cb, cb.stream("POST", "/v1/completions", json={**long, "prompt": "on and"}) as rb:
            out["b"] = sse_text(rb)

    def run_c():
        with httpx.Client(base_url=url, timeout=60) as cc:
            out["c"] = cc.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 12,
                                                        "temperature": 0}).json()["choices"][0]["text"]

    tb, tc = threading.Thread(target=run_b), threading.Thread(target=run_c)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**long, "prompt": "the"}) as r:  # A
                lines = r.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
                for line in lines:
                    if line.startswith("data:"):
                        break
                gate.clear()
                tb.start()
                gate.set()
                assert wait_until(lambda: sched.rows == 2), sched.rows
                gate.clear()
            # A's client hung up: its slot is freed while B keeps decoding.
            gate.set()
            assert wait_until(lambda: sched.rows == 1 and sched.batch.keys[0] is None), (sched.rows, sched.batch.keys)
            gate.clear()
            assert tb.is_alive() and sched.batch.keys[1] is not None, "B finished early: slot reuse not exercised"
            tc.start()
            assert wait_until(lambda: sched.pending.qsize() == 1), "C was not queued"
            gate.set()
            tc.join(120)
            tb.join(120)
    finally:
        gate.set()
    assert placed == [[0], [1], [0]]  # C took A's freed slot
    assert out["c"] == text(tok, hf(model, tok("hello there")["input_ids"], 12))
    assert out["b"] == decodekit.generate(model, tok, "on and", {"stop_at_eos": False}, max_new_tokens=220).texts[0]
    assert sched.batch.cache.allocated_bytes() == kv_bytes  # the memory was reused, nothing new allocated


def test_serve_static_request_that_cannot_fit_is_a_4xx_before_any_compute(served):
    url, sched, model, tok = served
    joined, steps = sched.stats["joined"], sched.stats["steps"]
    with httpx.Client(base_url=url, timeout=60) as c:
        # within the model's context (512) but not the static cache's 256 slots per row
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "the cat and", "max_tokens": 300})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded" and "--max-len" in err["message"]
        assert sched.stats["joined"] == joined and sched.stats["steps"] == steps
        # a chat request without max_tokens gets what fits the slot, and the server keeps serving
        body = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                    "decodekit": {"stop_at_eos": False}}).json()
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == MAX_LEN


def test_serve_static_compiled_step_compiles_before_serving_and_matches_transformers():
    """The server with the compiled static step (traced on CPU with the aot_eager backend): the step
    is compiled when the server starts, before any request; concurrent streaming requests that
    join while others decode get exactly transformers' greedy, and every decode step ran compiled."""
    model, tok = tiny_model(), tiny_tokenizer()
    app = create_app(model, tok, model_id=MODEL, max_batch=4, cache="static", max_len=64, compile=True,
                     compile_backend="aot_eager")
    sched = app.state.scheduler
    prompts, maxes = ["the cat and", "a", "in the end it is on", "hello there the one", "on and on"], [30, 12, 20, 9, 25]
    results: dict[int, str] = {}

    def one(i):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": maxes[i], "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            results[i] = sse_text(r)

    with running(app) as url:
        assert wait_until(lambda: sched.step_stats["warmup_s"] > 0), "the step was not compiled at start"
        assert sched.stats["joined"] == 0
        threads = []
        for i in range(len(prompts)):  # five requests, four batch slots: the fifth waits for a free one
            threads.append(threading.Thread(target=one, args=(i,)))
            threads[-1].start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
    for i, p in enumerate(prompts):
        assert results[i] == text(tok, hf(model, tok(p)["input_ids"], maxes[i])), i
    stats = sched.step_stats
    assert stats["compiled"] and stats["compiled_steps"] > 0 and stats["eager_steps"] == 0, stats
