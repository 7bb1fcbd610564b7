"""A few short checks on the embedded SmolLM2-135M-Instruct."""

import pytest
import torch

import decodekit
from decodekit import NoCache, Strategy
from decodekit.testing import hf_greedy

pytestmark = pytest.mark.real_model


def test_default_model_greedy_matches_transformers(real_model):
    model, tok = real_model
    prompts = ["The capital of France is", "def fibonacci(n):"]
    got = decodekit.generate(model, tok, prompts, Strategy(cache=NoCache(), stop_at_eos=False), max_new_tokens=8)
    assert got.token_ids == hf_greedy(model, tok, prompts, 8)


def test_default_strategy_matches_transformers_and_chat(real_model):
    model, tok = real_model
    got = decodekit.generate(model, tok, "What is 2+2? Answer with one number.", max_new_tokens=24, chat=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with one number."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=24, do_sample=False)
    ref = ref[0, ids["input_ids"].shape[1]:].tolist()
    assert got.token_ids[0] == ref  # EOS included, like transformers
    assert "4" in got.texts[0]
    assert got.finish_reasons[0] == "eos"


def test_loader_caches_the_conversion():
    from decodekit.models import DEFAULT_SHA256, default_model_dir

    d = default_model_dir()
    assert (d / "model.safetensors").is_file() and DEFAULT_SHA256[:12] in d.name
