"""decodekit-fsm's BannedWords inside transformers' generate: greedy, seeded sampling, beam search
and prompt lookup (the adapter is called on prefixes that are cut back and rows that reorder).

Oracles: the decoded text itself (a banned word must not occur, although the unconstrained
generation produces it) and decodekit's own loop with the same strategy (token-identical greedy).
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LogitsProcessorList

import decodekit
from decodekit.hf import as_logits_processor
from decodekit.testing import tiny_model, tiny_tokenizer

fsm = pytest.importorskip("decodekit_fsm")

PROMPTS = ["the cat and the dog and the cat and the", "in the end the"]
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=3),
}


def _words_it_says(texts: list[str], n: int = 3) -> list[str]:
    """Banned words taken from what the model says unconstrained (2-letter pieces), so the ban
    has something to prevent."""
    seen: list[str] = []
    for t in texts:
        for m in re.finditer(r"[a-z]{2}", t):
            if m.group() not in seen:
                seen.append(m.group())
    return seen[:n]


def _new_texts(tok, out, prompt_len):
    return [tok.decode(row[prompt_len:], skip_special_tokens=True) for row in out]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=5)
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return tok, model, batch


@pytest.mark.parametrize("mode", list(MODES))
def test_banned_words_never_appear_in_generate(mode, setup):
    tok, model, batch = setup
    P = batch.input_ids.shape[1]
    kw = dict(max_new_tokens=24, **MODES[mode])
    torch.manual_seed(0)
    free = _new_texts(tok, model.generate(**batch, **kw), P)
    words = _words_it_says(free)
    assert words, f"the unconstrained output {free!r} has no word to ban"
    adapter = as_logits_processor(fsm.BannedWords(words=words), tok)
    torch.manual_seed(0)
    out = model.generate(**batch, logits_processor=LogitsProcessorList([adapter]), **kw)
    for text in _new_texts(tok, out, P):
        assert not any(w in text for w in words), (words, text)


def test_banned_words_under_prompt_lookup(setup):
    tok, model, _ = setup
    ids = tok([PROMPTS[0]], return_tensors="pt")
    P = ids.input_ids.shape[1]
    kw = dict(max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4)
    words = _words_it_says(_new_texts(tok, model.generate(**ids, **kw), P))
    adapter = as_logits_processor(fsm.BannedWords(words=words), tok)
    out = model.generate(**ids, logits_processor=LogitsProcessorList([adapter]), **kw)
    text = _new_texts(tok, out, P)[0]
    assert words and not any(w in text for w in words), (words, text)
    # Greedy prompt lookup is greedy: the same tokens as plain greedy with the same ban.
    plain = model.generate(**ids, max_new_tokens=30, do_sample=False,
                           logits_processor=LogitsProcessorList([as_logits_processor(fsm.BannedWords(words=words), tok)]))
    assert torch.equal(out, plain)


def test_hf_greedy_with_banned_words_equals_decodekit_loop(setup):
    tok, model, batch = setup
    P = batch.input_ids.shape[1]
    words = ["he", "an"]
    out = model.generate(**batch, max_new_tokens=20, do_sample=False,
                         logits_processor=LogitsProcessorList([as_logits_processor(fsm.BannedWords(words=words), tok)]))
    ours = decodekit.generate(model, tok, PROMPTS, decodekit.Strategy(processors=[fsm.BannedWords(words=words)]), max_new_tokens=20)
    for r, ids in enumerate(ours.token_ids):
        assert out[r, P:P + len(ids)].tolist() == ids


def test_rollback_mode_is_refused_inside_generate(setup):
    tok, model, batch = setup
    words = _words_it_says(_new_texts(tok, model.generate(**batch, max_new_tokens=24, do_sample=False), batch.input_ids.shape[1]))
    adapter = as_logits_processor(fsm.BannedWords(words=words, mode="rollback"), tok)
    with pytest.raises(decodekit.DecodekitError, match="requested a rollback"):
        model.generate(**batch, max_new_tokens=24, do_sample=False, logits_processor=LogitsProcessorList([adapter]))


@pytest.mark.real_model
def test_banned_words_real_model_beam_and_prompt_lookup():
    model, tok = decodekit.load_model()
    msgs = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    P = ids["input_ids"].shape[1]
    words = ["fox", "dog"]
    for kw in (dict(prompt_lookup_num_tokens=5), dict(num_beams=2)):
        free = tok.decode(model.generate(**ids, max_new_tokens=12, do_sample=False, **kw)[0, P:])
        assert any(w in free for w in words), free
        adapter = as_logits_processor(fsm.BannedWords(words=words), tok)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList([adapter]), **kw)
        text = tok.decode(out[0, P:], skip_special_tokens=True)
        assert not any(w in text for w in words), text
