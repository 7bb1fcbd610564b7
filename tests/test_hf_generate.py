"""decodekit.hf.generate as transformers' custom_generate, GenerationConfig mapping, streamers.

Oracles: transformers' own generate (greedy, its own processors), decodekit.generate (the same
strategy through decodekit's API), and the GenerationConfig itself (round trip).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList, TextIteratorStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import decodekit
import decodekit.hf as dkhf
from decodekit.testing import tiny_model, tiny_tokenizer

samplers = pytest.importorskip("decodekit_samplers")

PROMPTS = ["the cat and the dog and the cat", "in the end", "and then the"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_custom_generate_greedy_equals_transformers(arch, batch):
    model = tiny_model(arch)
    kw = dict(max_new_tokens=16, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[40], [50, 60]])
    ours = model.generate(**batch, custom_generate=dkhf.generate, **kw)
    theirs = model.generate(**batch, do_sample=False, **kw)
    assert torch.equal(ours, theirs)


def test_custom_generate_equals_decodekit_generate(tok, batch):
    model = tiny_model("llama")
    strategy = decodekit.Strategy(
        processors=[samplers.RepetitionPenalty(1.2), samplers.Temperature(0.9), samplers.TopK(30)],
        sampler=samplers.Multinomial(),
    )
    out = model.generate(**batch, max_new_tokens=14, custom_generate=dkhf.generate, strategy=strategy, seed=11)
    ref = decodekit.generate(model, tok, PROMPTS, strategy, max_new_tokens=14, seed=11)
    P = batch.input_ids.shape[1]
    assert torch.equal(out[:, :P], batch.input_ids)
    for r, ids in enumerate(ref.token_ids):
        assert out[r, P:P + len(ids)].tolist() == ids
        assert (out[r, P + len(ids):] == model.generation_config.pad_token_id).all()  # finished rows padded


def test_custom_generate_speculative_greedy_equals_plain_greedy(batch):
    pytest.importorskip("decodekit_speculative")
    model = tiny_model("llama")
    plain = model.generate(**batch, max_new_tokens=16, do_sample=False)
    # prompt_lookup_num_tokens maps to decodekit's PromptLookup drafter (batch > 1 works; greedy stays greedy)
    ours = model.generate(**batch, max_new_tokens=16, prompt_lookup_num_tokens=3, custom_generate=dkhf.generate)
    assert torch.equal(ours, plain)


def test_custom_generate_return_dict_and_unwraps_the_adapter(tok, batch):
    model = tiny_model("llama")
    adapter = dkhf.as_logits_processor([samplers.NoRepeatNGram(2)], tok)
    out = model.generate(**batch, max_new_tokens=10, custom_generate=dkhf.generate, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([adapter]))
    theirs = model.generate(**batch, max_new_tokens=10, do_sample=False, no_repeat_ngram_size=2)
    assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, theirs)
    assert adapter.state is None  # its processors ran in decodekit's loop, not through the adapter


def test_custom_generate_refuses_what_it_cannot_honour(batch):
    model = tiny_model("llama")
    with pytest.raises(decodekit.DecodekitError, match=r"\['temperature'\] clash with strategy="):
        model.generate(**batch, max_new_tokens=4, do_sample=False, temperature=0.5, custom_generate=dkhf.generate,
                       strategy=decodekit.Strategy())
    with pytest.raises(decodekit.DecodekitError, match="output_scores"):
        model.generate(**batch, max_new_tokens=4, custom_generate=dkhf.generate, output_scores=True, return_dict_in_generate=True)
    with pytest.raises(decodekit.DecodekitError, match="left padding"):
        right = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
        model.generate(**right, max_new_tokens=4, custom_generate=dkhf.generate)


def test_streamers_get_the_text_generate_returns(tok):
    model = tiny_model("llama")
    # decodekit.generate(streamer=...) with transformers' TextIteratorStreamer (skip_prompt works)
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    res = decodekit.generate(model, tok, PROMPTS[0], max_new_tokens=12, streamer=streamer)
    assert "".join(streamer) == tok.decode(res.token_ids[0])
    # ... and through custom_generate, under the name transformers forwards
    ids = tok([PROMPTS[0]], return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = model.generate(**ids, max_new_tokens=12, custom_generate=dkhf.generate, decodekit_streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, ids.input_ids.shape[1]:])


def test_streamer_is_ended_when_generation_fails(tok):
    class Recorder:
        def __init__(self):
            self.ended = False

        def put(self, value):
            pass

        def end(self):
            self.ended = True

    class Boom(decodekit.Processor):
        def process_logits(self, state):
            raise RuntimeError("boom")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        decodekit.generate(tiny_model("llama"), tok, "the cat", decodekit.Strategy(processors=[Boom()]), max_new_tokens=3, streamer=rec)
    assert rec.ended


# ------------------------------------------------------------------------- GenerationConfig mapping
LISTED = {
    "temperature": 0.7, "top_k": 7, "top_p": 0.8, "min_p": 0.1, "typical_p": 0.9, "repetition_penalty": 1.4,
    "no_repeat_ngram_size": 3, "bad_words_ids": [[5], [6, 7]], "max_new_tokens": 33, "eos_token_id": [2, 9],
    "do_sample": True, "prompt_lookup_num_tokens": 4,
}


@pytest.mark.parametrize("field", list(LISTED))
def test_generation_config_round_trips(field):
    if field == "prompt_lookup_num_tokens":
        pytest.importorskip("decodekit_speculative")
    values = {field: LISTED[field]}
    if field in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
        values["do_sample"] = True
    cfg = GenerationConfig(**values)
    back = decodekit.Strategy.from_generation_config(cfg).to_generation_config()
    for f, v in values.items():
        assert getattr(back, f) == v, f


def test_generation_config_round_trips_all_at_once():
    pytest.importorskip("decodekit_speculative")
    cfg = GenerationConfig(**LISTED)
    strategy = decodekit.Strategy.from_generation_config(cfg)
    back = strategy.to_generation_config()
    assert {f: getattr(back, f) for f in LISTED} == LISTED
    # transformers' order: penalties, bad words, then the warpers
    names = [type(p).component_name() for p in strategy.processors]
    assert names == ["RepetitionPenalty", "NoRepeatNGram", "HFProcessor", "Temperature", "TopK", "TopP", "MinP", "Typical"]


def test_mapped_warpers_equal_transformers_warpers():
    # The processed distribution (what sampling draws from) equals transformers' own chain.
    model = tiny_model("llama")
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.85, min_p=0.02, typical_p=0.95, repetition_penalty=1.3)
    hf_chain = model._get_logits_processor(generation_config=cfg, input_ids_seq_length=6, encoder_input_ids=None,
                                           prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device="cpu")
    ours = dkhf.as_logits_processor(decodekit.Strategy.from_generation_config(cfg).processors)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 6), generator=g)
    for step in range(3):
        scores = torch.randn(2, 330, generator=g) * 3
        want, got = hf_chain(ids, scores.clone()), ours(ids, scores.clone())
        assert torch.equal(torch.isinf(want), torch.isinf(got))
        torch.testing.assert_close(got, want)
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)


@pytest.mark.parametrize("field,value", [("num_beams", 4), ("min_length", 5), ("guidance_scale", 2.0), ("suppress_tokens", [3])])
def test_generation_config_unhonourable_field_is_named(field, value):
    with pytest.raises(decodekit.DecodekitError, match=f"GenerationConfig.{field}="):
        decodekit.Strategy.from_generation_config(GenerationConfig(**{field: value}))


def test_warper_without_do_sample_is_an_error_but_defaults_are_not():
    with pytest.raises(decodekit.DecodekitError, match="GenerationConfig.temperature=0.5 only acts when sampling"):
        decodekit.Strategy.from_generation_config(GenerationConfig(temperature=0.5))
    # transformers fills top_k=50 etc. into every prepared config: inert without sampling
    s = decodekit.Strategy.from_generation_config(GenerationConfig(top_k=50, temperature=1.0, max_new_tokens=5))
    assert s.processors == [] and s.max_new_tokens == 5


def test_mapped_strategy_runs_in_decodekit_generate(tok):
    model = tiny_model("llama")
    cfg = GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=2, max_new_tokens=12, eos_token_id=2)
    res = decodekit.generate(model, tok, PROMPTS, decodekit.Strategy.from_generation_config(cfg))  # max_new_tokens from the strategy
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    theirs = model.generate(**batch, generation_config=cfg, do_sample=False)
    P = batch.input_ids.shape[1]
    for r, ids in enumerate(res.token_ids):
        assert theirs[r, P:P + len(ids)].tolist() == ids
