"""`decodekit search-skip`: optuna search over sublayer skip sets, progress, a JSON SelfSpeculative loads."""

import json

import pytest

import decodekit
from decodekit import Strategy
from decodekit.testing import tiny_model, tiny_tokenizer
from decodekit_speculative import SelfSpeculative


def test_search_skip_command(tmp_path, capsys, oracle):
    pytest.importorskip("optuna")
    from decodekit.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama", num_hidden_layers=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat and the dog\non and on and on\n")
    out = tmp_path / "skip.json"
    rc = main(["search-skip", str(model_dir), "--trials", "4", "--k", "3", "--max-new-tokens", "8",
               "--prompts", str(prompts), "--no-chat", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "baseline" in err and "trial 4/4" in err  # progress, one line per trial
    result = json.loads(out.read_text())
    assert result["layers"] == 4 and result["trials"] == 4
    assert 1 <= len(result["skip_attention"]) + len(result["skip_mlp"]) <= 4
    assert result["tokens_per_s"] > 0 and result["speedup"] > 0
    # the file drives SelfSpeculative, and greedy stays identical
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    drafter = SelfSpeculative(skip_file=str(out), adaptive=False)
    assert (drafter.skip_attention, drafter.skip_mlp) == (result["skip_attention"], result["skip_mlp"])
    tok = tiny_tokenizer()
    got = decodekit.generate(model, tok, ["the cat and the"], Strategy(drafter=drafter, stop_at_eos=False), max_new_tokens=12)
    want = decodekit.generate(model, tok, ["the cat and the"], Strategy(stop_at_eos=False), max_new_tokens=12)
    assert got.token_ids == want.token_ids and got.stats["drafted"] > 0


def test_search_skip_without_optuna_names_the_fix(monkeypatch, capsys):
    import sys

    from decodekit.cli import main

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    assert main(["search-skip", "default", "--trials", "1"]) == 2
    assert "pip install 'decodekit-speculative[search]'" in capsys.readouterr().err
