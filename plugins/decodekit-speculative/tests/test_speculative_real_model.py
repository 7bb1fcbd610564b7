"""The embedded SmolLM2-135M-Instruct: greedy identity of every drafter at batch 1 and 4."""

import pytest

import decodekit
from decodekit import Strategy
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative

TEXT = "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships."
PROMPTS = [f"Repeat this sentence exactly: {TEXT}", "Name three colours.", f"Quote: {TEXT}", "What is 2+2?"]


@pytest.fixture(scope="module")
def real():
    return decodekit.load_model()


@pytest.mark.real_model
@pytest.mark.parametrize("batch", [1, 4])
def test_real_model_greedy_identity(real, batch):
    model, tok = real
    prompts = PROMPTS[:batch]
    n = 24 if batch == 1 else 12
    plain = decodekit.generate(model, tok, prompts, Strategy(), max_new_tokens=n, chat=True)
    drafters = [PromptLookup(ngram=3, k=8), SelfSpeculative(skip_attention=[10, 11, 12, 13], k=4)]
    if batch == 1:
        drafters.append(DraftModel(model=model, k=3))  # draft == target: accepts everything
    for drafter in drafters:
        got = decodekit.generate(model, tok, prompts, Strategy(drafter=drafter), max_new_tokens=n, chat=True)
        assert got.token_ids == plain.token_ids, type(drafter).__name__
        if isinstance(drafter, DraftModel):
            assert got.stats["acceptance_rate"] == 1.0
    if batch == 1:
        lookup = decodekit.generate(model, tok, prompts, Strategy(drafter=PromptLookup(ngram=3, k=8)), max_new_tokens=n, chat=True)
        assert lookup.stats["forward_passes"] < plain.stats["forward_passes"] / 2  # the quote is found
