"""The scheduler's incremental detokeniser against the oracle: decoding the whole token list."""

from __future__ import annotations

import random

from decodekit.testing import tiny_tokenizer
from decodekit_serve.scheduler import IncrementalText

TEXTS = ["the cat and the dog", "café au lait, naïve", "日本語のテキスト and more", "emoji 🙂🐈 end",
         "</s> special <s> tokens", "a  b   c\n\nd"]


def test_incremental_text_equals_a_full_decode_through_partial_characters_and_rollbacks():
    """Tokens arrive one to three at a time (multi-byte characters split across byte tokens), and
    sometimes the last few are rolled back and replaced: after every update the text equals
    ``decode(tokens)``."""
    tok = tiny_tokenizer()
    rng = random.Random(0)
    pool = [t for s in TEXTS for t in tok(s)["input_ids"]]
    for text in TEXTS:
        target = tok(text)["input_ids"] + [rng.choice(pool) for _ in range(20)]
        inc, tokens, partial = IncrementalText(tok), [], 0
        while len(tokens) < len(target):
            lo = len(tokens)
            if tokens and rng.random() < 0.2:  # a rollback: the tail is replaced
                lo = max(0, len(tokens) - rng.randint(1, 4))
                tokens = tokens[:lo] + [rng.choice(pool)]
            else:
                tokens = tokens + target[len(tokens):len(tokens) + rng.randint(1, 3)]
            got = inc.update(tokens, lo)
            assert got == tok.decode(tokens, skip_special_tokens=True), (text, tokens)
            partial += got.endswith("\ufffd")
        assert inc.q <= len(tokens) and inc.settled == inc.text[: len(inc.settled)]
    assert partial, "no update ended inside a multi-byte character: the U+FFFD path is untested"
