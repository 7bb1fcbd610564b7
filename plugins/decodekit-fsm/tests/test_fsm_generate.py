"""End to end through decodekit.generate: tiny models, every mode, batches, speculation, errors."""

import re

import pytest
import torch

import decodekit
from decodekit import Drafter, Proposal, Strategy
from decodekit.testing import tiny_model, tiny_tokenizer
from decodekit_fsm import BannedWords

WORDS = ["the", "an", "in", "on"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def leaks(text, words, case_sensitive=True):
    t = text if case_sensitive else text.casefold()
    return [w for w in words if (w if case_sensitive else w.casefold()) in t]


class Boost(decodekit.Processor):
    """Adversary: adds a large bonus to every token whose text is a piece of a banned word."""

    bonus: float = 30.0
    words: list[str] = ["the"]

    def setup(self, state):
        tok = state.tokenizer
        ids = [i for i in range(len(tok)) if (s := tok.decode([i]).strip().casefold()) and any(s in w.casefold() for w in self.words)]
        self._ids = torch.tensor(ids, dtype=torch.long)

    def process_logits(self, state):
        s = state.scores.clone()
        s[..., self._ids.to(s.device)] += self.bonus
        return s


class RepeatDrafter(Drafter):
    """A real (if simple) deterministic drafter: proposes the last k committed tokens again, which on
    a tiny model's repetitive output gets accepted often (prompt-lookup style)."""

    k: int = 3

    def pre_logits(self, state):
        ids = state.committed_ids()
        return Proposal(tokens=ids[:, -self.k:])


@pytest.mark.parametrize("mode", ["mask", "rollback", "hybrid"])
def test_fsm_adversarial_tiny_no_leak(model, tok, mode):
    prompts = ["the cat", "hello there", "on and on"]
    boost = Boost(words=WORDS)
    base = decodekit.generate(model, tok, prompts, Strategy(processors=[boost]), max_new_tokens=20)
    assert any(leaks(t, WORDS) for t in base.texts)  # the adversary does make the words appear
    bw = BannedWords(words=WORDS, mode=mode)
    res = decodekit.generate(model, tok, prompts, Strategy(processors=[boost, bw]), max_new_tokens=20)
    for t, ids in zip(res.texts, res.token_ids):
        assert leaks(t, WORDS) == []
        assert len(ids) == 20


@pytest.mark.parametrize("mode", ["mask", "rollback"])
def test_fsm_case_insensitive_whole_word_and_patterns(model, tok, mode):
    boost = Boost(words=["The", "ON"])
    bw = BannedWords(words=["the", "on"], patterns=[r"[0-9][0-9]"], case_sensitive=False, whole_word=True, mode=mode)
    res = decodekit.generate(model, tok, ["The ON", "x"], Strategy(processors=[boost, bw]), max_new_tokens=24, seed=1)
    for t in res.texts:
        assert not re.search(r"(?<!\w)(the|on)(?!\w)", t.casefold()), t
        assert not re.search(r"[0-9][0-9]", t)


def test_fsm_mask_mode_batch_equals_single_rows(model, tok):
    bw = BannedWords(words=WORDS)
    prompts = ["the cat", "a much longer prompt about things", "on"]
    batch = decodekit.generate(model, tok, prompts, Strategy(processors=[bw]), max_new_tokens=20)
    for p, ids in zip(prompts, batch.token_ids):
        single = decodekit.generate(model, tok, p, Strategy(processors=[bw]), max_new_tokens=20)
        assert single.token_ids[0] == ids


def test_fsm_speculative_greedy_identical(model, tok):
    # Verify positions get their own masks: greedy with a drafter must equal greedy without.
    bw = BannedWords(words=WORDS, patterns=["e[a-z]e"])
    plain = decodekit.generate(model, tok, ["the cat", "on and on"], Strategy(processors=[Boost(words=WORDS), bw]), max_new_tokens=20)
    spec = decodekit.generate(model, tok, ["the cat", "on and on"], Strategy(processors=[Boost(words=WORDS), bw], drafter=RepeatDrafter()),
                              max_new_tokens=20)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["forward_passes"] < plain.stats["forward_passes"]


def test_fsm_rollback_bans_only_that_position(model, tok):
    # The first choice at the rolled-back position is banned there only; the row then continues freely.
    bw = BannedWords(words=["the"], mode="rollback", max_retries=2)
    res = decodekit.generate(model, tok, ["the the the"], Strategy(processors=[Boost(words=["the"]), bw]), max_new_tokens=25)
    assert "the" not in res.texts[0]
    assert res.stats["forward_passes"] > 25  # rollbacks happened: the text was re-decoded


def test_fsm_stream_holds_back_only_undecided_text(model, tok):
    bw = BannedWords(words=WORDS, mode="rollback")
    strat = Strategy(processors=[Boost(words=WORDS), bw])
    streamed = "".join(decodekit.stream(model, tok, "the cat", strat, max_new_tokens=20))
    final = decodekit.generate(model, tok, "the cat", strat, max_new_tokens=20).texts[0]
    assert streamed == final  # nothing streamed was ever taken back
    assert leaks(streamed, WORDS) == []


def test_fsm_bad_input_errors(model, tok):
    with pytest.raises(ValueError, match=r"words\[1\].*empty"):
        BannedWords(words=["ok", ""])
    with pytest.raises(ValueError, match=r"'\\\\bfoo'.*not support"):
        BannedWords(patterns=[r"\bfoo"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        BannedWords(patterns=["(ab"])
    with pytest.raises(ValueError, match="matches the empty string"):
        BannedWords(patterns=["a*"])
    with pytest.raises(ValueError, match="at least one"):
        BannedWords()
    # Every token that writes text is banned and EOS is not a way out: a clear error, no NaN, no hang.
    bw = BannedWords(patterns=[r"[\s\S]"])
    with pytest.raises(decodekit.DecodekitError, match="no token is allowed"):
        decodekit.generate(model, tok, "hi", Strategy(processors=[bw], stop_at_eos=False), max_new_tokens=5)


def test_fsm_json_roundtrip():
    s = Strategy(processors=[{"name": "BannedWords", "words": ["x"], "mode": "hybrid"}])
    again = Strategy.from_json(s.to_json())
    assert again.processors[0] == s.processors[0]
