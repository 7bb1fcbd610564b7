"""Property tests: the mask allows a token iff appending it creates no match (brute-force oracle:
Python's own UTF-8 decoder, str.casefold, str.find and re.search over the whole text)."""

import codecs
import re

import numpy as np
from hypothesis import example, HealthCheck, assume, given, settings
from hypothesis import strategies as st

from decodekit_fsm.automaton import Engine, is_word

# Overlapping pieces, mixed case, a 2-byte character and its two halves (partial UTF-8).
PIECES = ["a", "b", "ab", "ba", "abb", "A", "B", "Ab", "aB", " ", " a", "b ", "-", "é", "É", "\xc3", "\xa9", "\x89", "ß", "ss"]


def as_bytes(p):
    # "\xc3" / "\xa9" / "\x89" stand for single raw bytes (halves of "é" / "É").
    return bytes([ord(p)]) if len(p) == 1 and 0x80 <= ord(p) < 0x100 and p not in "éÉß" else p.encode()


def text_of(bs, final=False):
    return codecs.getincrementaldecoder("utf-8")("replace").decode(bs, final)


def occurs(text, words, patterns, ww, at_end):
    for w in words:
        i = text.find(w)
        while i >= 0:
            if not ww:
                return True
            j = i + len(w)
            left = not is_word(w[0]) or i == 0 or not is_word(text[i - 1])
            right = not is_word(w[-1]) or (j < len(text) and not is_word(text[j])) or (j == len(text) and at_end)
            if left and right:
                return True
            i = text.find(w, i + 1)
    return any(re.search(p, text) for p in patterns)


def oracle(vocab, prefix, words, patterns, cs, ww, at_end):
    norm = (lambda s: s) if cs else str.casefold
    ws = [norm(w) for w in words]
    base = b"".join(vocab[t] for t in prefix)
    out = []
    for t in range(len(vocab)):
        text = norm(text_of(base + vocab[t], final=at_end))
        out.append(occurs(text, ws, patterns, ww, at_end))
    return np.array(out)


vocab_st = st.lists(st.sampled_from(PIECES), min_size=4, max_size=14, unique=True).map(lambda ps: [b""] + [as_bytes(p) for p in ps])
words_st = st.lists(st.text(alphabet="abAB -éß", min_size=1, max_size=4), min_size=1, max_size=4)
# "a[^b]" and "[^a-z ]" can match the U+FFFD that ends a text cut inside a character.
pattern_st = st.lists(st.sampled_from(["a[b ]a", "b+a", "(ab|ba)b", "é", "a[^b]", "[^a-z ]"]), max_size=2)


@example(vocab=[b"", b"a", b"\xa9", b"\xc3", b"b"], words=["A"], patterns=["[^a-z ]"], cs=False, ww=False,
         prefix_idx=[3], at_end=True)  # a silent token ending the text after an open byte (found by hypothesis)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(vocab=vocab_st, words=words_st, patterns=pattern_st, cs=st.booleans(), ww=st.booleans(),
       prefix_idx=st.lists(st.integers(0, 100), max_size=6), at_end=st.booleans())
def test_fsm_mask_matches_bruteforce(vocab, words, patterns, cs, ww, prefix_idx, at_end):
    prefix = [i % len(vocab) for i in prefix_idx]
    norm = (lambda s: s) if cs else str.casefold
    ws = [norm(w) for w in words]
    # The prefix itself must be match-free (the mask only ever sees such prefixes).
    assume(not occurs(norm(text_of(b"".join(vocab[t] for t in prefix))), ws, patterns, ww, False))
    pats = patterns if cs else [p for p in patterns if p == p.casefold()]
    eng = Engine(vocab, len(vocab), words, pats, cs, ww, end_ids=())
    sid = eng.start
    for t in prefix:
        step = eng.advance(sid, t)
        assert step.hit is None  # the host automaton agrees the prefix is clean
        sid = step.sid
    got = eng.mask_np(sid, at_end)
    want = oracle(vocab, prefix, words, pats, cs, ww, at_end)
    assert (got == want).all(), (words, pats, [vocab[t] for t in prefix], np.nonzero(got != want))
    # The host-side step agrees with the mask token by token.
    if not at_end:
        host = np.array([eng.advance(sid, t).hit is not None for t in range(len(vocab))])
        assert (host == want).all()


def test_fsm_eos_ends_text_for_whole_word():
    vocab = [b"", b"cat", b" ", b"s", b"</s>"]
    eng = Engine(vocab, len(vocab), ["cat"], [], True, True, end_ids=[4])
    after_cat = eng.advance(eng.start, 1).sid
    m = eng.mask_np(after_cat)
    # "cat" + EOS ends the text right after the word: banned; "cat" + " " too; "cat" + "s" is "cats": fine.
    assert m.tolist() == [False, False, True, False, True]
