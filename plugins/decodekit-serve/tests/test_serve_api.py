"""A live decodekit server on 127.0.0.1 (tiny random model), exercised over real HTTP with httpx
and the ``openai`` client. Oracles: transformers ``generate`` (greedy, no_repeat_ngram_size) and a
solo ``decodekit.generate`` (seeded sampling)."""

from __future__ import annotations

import argparse
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

MODEL = "tiny"


@pytest.fixture(scope="module")
def served():
    model, tok = tiny_model(), tiny_tokenizer()
    app = create_app(model, tok, model_id=MODEL, max_batch=8)
    with running(app) as url:
        yield url, app.state.scheduler, model, tok


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


def hf(model, ids: list[int], n: int, **kw) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=2, **kw)
    return out[0, len(ids):].tolist()


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def sse(resp: httpx.Response) -> list[dict]:
    """Parse an SSE body strictly: only ``data:`` lines, the last one ``[DONE]``."""
    events = [line[len("data: "):] for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def wait_until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------- basics
def test_serve_plugin_is_installed():
    assert "serve" in [p.name for p in get_plugin_manager().plugins()]
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    import decodekit_serve

    decodekit_serve.decodekit_register_commands(sub)
    args = parser.parse_args(["serve"])
    assert args.host == "127.0.0.1"  # loopback only by default
    assert args.func.__name__ == "_serve"


def test_serve_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]


def test_serve_completion_greedy_matches_transformers(served, client):
    _, _, model, tok = served
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "the cat and", "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = hf(model, tok("the cat and")["input_ids"], 10)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == text_of(tok, want)
    assert body["choices"][0]["finish_reason"] == ("stop" if 2 in want else "length")
    assert body["usage"] == {"prompt_tokens": len(tok("the cat and")["input_ids"]), "completion_tokens": len(want),
                             "total_tokens": len(tok("the cat and")["input_ids"]) + len(want)}


def test_serve_completion_stream_equals_nonstream(served, client):
    req = {"model": MODEL, "prompt": "hello there", "max_tokens": 9, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r)
    plain = client.post("/v1/completions", json={k: v for k, v in req.items() if k != "stream_options"}).json()
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain["choices"][0]["text"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [plain["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) > 1  # really incremental


def test_serve_chat_stream_and_nonstream_match_transformers(served, client):
    _, _, model, tok = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the end"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = text_of(tok, hf(model, ids, 8))
    req = {"model": MODEL, "messages": msgs, "max_tokens": 8}
    body = client.post("/v1/chat/completions", json=req).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == len(ids)
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"][0]["delta"] == {}


def test_serve_concurrent_requests_share_the_batch(served):
    """Requests sent together decode in one batch (not one after another) and each still gets
    exactly its own greedy continuation."""
    url, sched, model, tok = served
    prompts = ["the cat and", "a", "in the end it is on", "hello there the one", "on and on"]
    maxes = [12, 6, 10, 8, 11]
    results: dict[int, str] = {}
    rows_before = sched.stats["max_rows"]
    sched.stats["max_rows"] = 0

    def one(i):
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": prompts[i], "max_tokens": maxes[i], "stream": True}) as r:
                results[i] = "".join(ch["choices"][0]["text"] for ch in sse(r))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sched.stats["max_rows"] >= 2, "the requests were serialised, never batched"
    sched.stats["max_rows"] = max(sched.stats["max_rows"], rows_before)
    for i, p in enumerate(prompts):
        assert results[i] == text_of(tok, hf(model, tok(p)["input_ids"], maxes[i])), i


def test_serve_stop_strings(served, client):
    _, _, model, tok = served
    full = text_of(tok, hf(model, tok("the cat and")["input_ids"], 12))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    for stream in (False, True):
        req = {"model": MODEL, "prompt": "the cat and", "max_tokens": 12, "stop": [stop], "stream": stream}
        if stream:
            with client.stream("POST", "/v1/completions", json=req) as r:
                chunks = sse(r)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            body = client.post("/v1/completions", json=req).json()
            text, finish = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
        assert text == full[: full.find(stop)] and finish == "stop"


# ---------------------------------------------------------------------------------- strategies
def _need(*names):
    missing = [n for n in names if n not in get_plugin_manager().components]
    if missing:
        pytest.skip(f"needs components {missing} (decodekit-samplers)")


def test_serve_openai_sampling_fields_match_solo_generate(served, client):
    _need("Temperature", "TopP", "Multinomial", "PresencePenalty", "FrequencyPenalty")
    _, _, model, tok = served
    req = {"model": MODEL, "prompt": "the cat and", "max_tokens": 10, "temperature": 1.2, "top_p": 0.95, "seed": 17,
           "presence_penalty": 0.5, "frequency_penalty": 0.7}
    got = [client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(2)]
    strategy = {"processors": [{"name": "PresencePenalty", "presence_penalty": 0.5}, {"name": "FrequencyPenalty", "frequency_penalty": 0.7},
                               {"name": "Temperature", "temperature": 1.2}, {"name": "TopP", "top_p": 0.95}], "sampler": "Multinomial"}
    want = decodekit.generate(model, tok, "the cat and", strategy, max_new_tokens=10, seed=17).texts[0]
    assert got == [want, want]
    other = client.post("/v1/completions", json={**req, "seed": 18}).json()["choices"][0]["text"]
    assert other != want


def test_serve_logit_bias(served, client):
    _need("LogitBias")
    _, _, model, tok = served
    t = tok(" the")["input_ids"][0]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 5, "temperature": 0,
                                                "logit_bias": {str(t): 100}}).json()
    assert body["choices"][0]["text"] == text_of(tok, [t] * 5)


def test_serve_decodekit_strategy_field_matches_transformers(served, client):
    """Any installed component through the ``decodekit`` field: NoRepeatNGram vs HF's own."""
    _need("NoRepeatNGram")
    _, _, model, tok = served
    prompt = "on and on and on"
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                "decodekit": {"processors": [{"name": "NoRepeatNGram", "no_repeat_ngram_size": 2}]}}).json()
    assert body["choices"][0]["text"] == text_of(tok, hf(model, tok(prompt)["input_ids"], 12, no_repeat_ngram_size=2))


# ---------------------------------------------------------------------------------- disconnects
def test_serve_stream_disconnect_frees_the_row(served):
    url, sched, *_ = served
    cancelled = sched.stats["cancelled"]
    req = {"model": MODEL, "prompt": "the", "max_tokens": 400, "stream": True, "decodekit": {"stop_at_eos": False}}
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=req) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    break
            assert sched.rows == 1
    # The client closed the connection after the first chunk: the row must leave the batch.
    assert wait_until(lambda: sched.stats["cancelled"] == cancelled + 1 and sched.rows == 0), (sched.stats, sched.rows)
    assert sched.batch.state is None and sched.batch.cache.allocated_bytes() == 0


def test_serve_nonstream_disconnect_frees_the_row(served):
    url, sched, *_ = served
    cancelled, joined = sched.stats["cancelled"], sched.stats["joined"]
    req = {"model": MODEL, "prompt": "the", "max_tokens": 500, "decodekit": {"stop_at_eos": False}}
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=0.5)) as c:  # 500 tiny-model tokens take longer than 0.5 s
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            c.post("/v1/completions", json=req)
    assert sched.stats["joined"] == joined + 1  # it was decoding when the client left
    assert wait_until(lambda: sched.stats["cancelled"] == cancelled + 1 and sched.rows == 0), (sched.stats, sched.rows)


# ---------------------------------------------------------------------------------- bad input
BAD = [
    ("malformed JSON", b'{"model": "tiny", "prompt": ', 400, None),
    ("unknown field", {"model": MODEL, "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ("temperature out of range", {"model": MODEL, "prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ("top_p out of range", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("max_tokens 0", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("penalty out of range", {"model": MODEL, "prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    ("logit_bias value", {"model": MODEL, "prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit_bias token", {"model": MODEL, "prompt": "a", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("too many stops", {"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n > 1", {"model": MODEL, "prompt": "a", "n": 2}, 400, "n"),
    ("unknown model", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("missing prompt", {"model": MODEL}, 400, "prompt"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("unknown component", {"model": MODEL, "prompt": "a", "decodekit": {"processors": ["NoSuchThing"]}}, 400, "decodekit"),
    ("bad component config", {"model": MODEL, "prompt": "a", "decodekit": {"sampler": {"name": "Greedy", "x": 1}}}, 400, None),
    ("unknown strategy field", {"model": MODEL, "prompt": "a", "decodekit": {"procesors": []}}, 400, "decodekit"),
    ("strategy cache", {"model": MODEL, "prompt": "a", "decodekit": {"cache": "NoCache"}}, 400, "decodekit.cache"),
    ("over-long prompt", {"model": MODEL, "prompt": "the " * 600}, 400, "prompt"),
    ("prompt + max_tokens too long", {"model": MODEL, "prompt": "a b", "max_tokens": 600}, 400, "max_tokens"),
    ("chat: no messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat: bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_serve_bad_input_is_a_4xx_openai_error(client, what, body, status, param):
    path = "/v1/chat/completions" if what.startswith("chat") else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, (what, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    # ... and the server keeps serving
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_serve_sampling_fields_without_samplers_plugin_name_the_distribution(client, monkeypatch):
    pm = get_plugin_manager()
    for name in ("Temperature", "Multinomial"):
        monkeypatch.delitem(pm.components, name, raising=False)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "temperature": 0.7})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "temperature" and err["code"] == "component_not_installed"
    assert "decodekit-samplers" in err["message"]


# ---------------------------------------------------------------------------------- openai client
def test_serve_openai_client(served):
    openai = pytest.importorskip("openai")
    url, _, model, tok = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    want = text_of(tok, hf(model, tok("the cat and")["input_ids"], 7))
    c = client.completions.create(model=MODEL, prompt="the cat and", max_tokens=7, temperature=0)
    assert c.choices[0].text == want and c.usage.completion_tokens == len(hf(model, tok("the cat and")["input_ids"], 7))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(model=MODEL, prompt="the cat and", max_tokens=7, stream=True))
    assert streamed == want
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6)
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, stream=True)]
    assert "".join(parts) == chat.choices[0].message.content
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a", temperature=9)
    assert e.value.body["param"] == "temperature"
    out = client.completions.create(model=MODEL, prompt="a", max_tokens=3, extra_body={"decodekit": {"stop_at_eos": False}})
    assert out.usage.completion_tokens == 3
