"""Docs stay in step with the code: every hook documented; the example plugin really works."""

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import decodekit.hookspecs as hs

ROOT = Path(__file__).resolve().parents[1]


def hookspec_names():
    return sorted(n for n in dir(hs) if n.startswith("decodekit_") and callable(getattr(hs, n)))


def test_every_hook_is_documented():
    page = (ROOT / "docs" / "hooks.md").read_text()
    documented = set(re.findall(r"^## (decodekit_\w+)$", page, re.M))
    missing = set(hookspec_names()) - documented
    assert not missing, f"hooks missing from docs/hooks.md: {sorted(missing)}"
    for name in hookspec_names():
        doc = getattr(hs, name).__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        # STYLE.md: every hookspec ends by saying how often it runs and how results combine.
        assert re.search(r"Runs once per [\w\- ]+", doc), f"{name}: docstring must say how often it runs"


def test_example_plugin_installs_into_a_fresh_venv_and_runs(tmp_path):
    """Build docs/examples/decodekit-softcap, pip install it into a new virtual environment (which
    sees this environment's packages, so torch is not downloaded again) and use it from there."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    example = ROOT / "docs" / "examples" / "decodekit-softcap"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation", str(example)]
        if _pip_has_python_flag()
        else [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(example)],
        check=True,
    )
    script = r"""
import json, subprocess, sys
import decodekit, decodekit_softcap
from decodekit.testing import tiny_model, tiny_tokenizer
names = {p.name for p in decodekit.get_plugin_manager().plugins()}
assert "softcap" in names, names
m, t = tiny_model("llama"), tiny_tokenizer()
s = decodekit.Strategy.from_json('{"cache": "NoCache", "processors": [{"name": "SoftCap", "cap": 0.5}], "stop_at_eos": false}')
r = decodekit.generate(m, t, "the cat", s, max_new_tokens=5)
print(json.dumps({"steps": decodekit_softcap.COMMITTED, "ids": r.token_ids[0]}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECODEKIT_")}
    out = subprocess.run([str(py), "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["steps"] == [1] * 5  # its accept hook ran once per step
    listed = subprocess.run([str(py), "-m", "decodekit.cli", "plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    assert any(p["name"] == "softcap" and p["distribution"] == "decodekit-softcap" for p in json.loads(listed.stdout))
    # The plugin is not visible outside that venv.
    assert "softcap" not in {p.name for p in __import__("decodekit").get_plugin_manager().plugins()}


def _pip_has_python_flag():
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout
    major, minor = (int(x) for x in out.split()[1].split(".")[:2])
    return (major, minor) >= (22, 3)
