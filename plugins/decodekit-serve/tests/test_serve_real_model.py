"""One short test on the embedded SmolLM2-135M-Instruct: two concurrent chat requests in one batch
(dynamic and static KV cache) decode what each decodes alone (decodekit.generate, itself checked against transformers)."""

from __future__ import annotations

import threading

import httpx
import pytest

import decodekit
from decodekit_serve import create_app, running


@pytest.mark.real_model
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_serve_real_model_concurrent_chat(cache):
    model, tok = decodekit.load_model()
    questions = ["What is the capital of France?", "Name a colour."]
    want = [decodekit.generate(model, tok, [{"role": "user", "content": q}], max_new_tokens=8, chat=True).texts[0] for q in questions]
    app = create_app(model, tok, model_id="smol", max_batch=4, cache=cache, max_len=256)
    got: dict[int, str] = {}
    with running(app) as url:
        def ask(i):
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post("/v1/chat/completions", json={"model": "smol", "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": questions[i]}]})
                got[i] = r.json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert app.state.scheduler.stats["max_rows"] == 2
    assert [got[0], got[1]] == want
