"""Plugin loading through real entry points (a *.dist-info on sys.path, as pip would install)."""

import sys
import textwrap
import warnings

import pytest

import decodekit
from decodekit import PluginError, Strategy
from decodekit.plugins import PluginManager


def install(tmp_path, monkeypatch, dist, module, source):
    """Make `dist` an installed distribution whose entry point (group decodekit) is `module`."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    info = tmp_path / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[decodekit]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


GOOD = """
    import torch
    from decodekit import Processor, hookimpl

    class AddOne(Processor):
        amount: float = 1.0
        def process_logits(self, state):
            return state.scores + self.amount

    class Boom(Processor):
        def process_logits(self, state):
            raise ZeroDivisionError("boom")

    CALLS = []

    @hookimpl
    def decodekit_register_components(register):
        register(AddOne)
        register(Boom)

    @hookimpl
    def decodekit_accept(state):
        CALLS.append(int(state.accepted.sum()))
"""


def test_entry_point_plugin_is_loaded_and_listed(tmp_path, monkeypatch, llama, tok):
    install(tmp_path, monkeypatch, "decodekit-good", "dk_good", GOOD)
    pm = PluginManager()
    info = {p.name: p for p in pm.plugins()}["dk_good"]
    assert info.distribution == "decodekit-good" and info.version == "1.2.3"
    assert "decodekit_accept" in info.hooks and "AddOne" in info.components
    # A per-token hookimpl of a plugin runs in every generation, once per step.
    import dk_good

    decodekit.generate(llama, tok, "the", Strategy(processors=["AddOne"], stop_at_eos=False), max_new_tokens=5)
    assert dk_good.CALLS == [1] * 5


def test_exception_in_hook_names_plugin_and_hook(tmp_path, monkeypatch, llama, tok):
    install(tmp_path, monkeypatch, "decodekit-good", "dk_good", GOOD)
    with pytest.raises(ZeroDivisionError) as e:
        decodekit.generate(llama, tok, "the", Strategy(processors=[{"name": "Boom"}]), max_new_tokens=3)
    assert any("Boom.process_logits" in n for n in e.value.__notes__)

    bad_setup = GOOD.replace("register(Boom)", "register(Boom); raise KeyError('setup failed')")
    (tmp_path / "x").mkdir()
    install(tmp_path / "x", monkeypatch, "decodekit-bad-setup", "dk_bad_setup", bad_setup)
    monkeypatch.setenv("DECODEKIT_PLUGINS", "dk_bad_setup")
    with pytest.raises(KeyError) as e:
        PluginManager()
    assert any("dk_bad_setup" in n and "decodekit_register_components" in n for n in e.value.__notes__)


def test_allowlist_and_disable(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "decodekit-good", "dk_good", GOOD)
    monkeypatch.setenv("DECODEKIT_PLUGINS", "something_else")
    assert "dk_good" not in {p.name for p in PluginManager().plugins()}
    monkeypatch.setenv("DECODEKIT_PLUGINS", "dk_good")
    assert "dk_good" in {p.name for p in PluginManager().plugins()}
    monkeypatch.delenv("DECODEKIT_PLUGINS")
    monkeypatch.setenv("DECODEKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = PluginManager()
    assert [p.name for p in pm.plugins()] == ["decodekit.core"]
    # The core alone still generates (greedy, no cache).
    assert set(pm.components) == {"Greedy", "NoCache", "HFProcessor"}


def test_plugin_failing_to_import_is_skipped_with_a_warning(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "decodekit-broken", "dk_broken", "import not_a_module_anywhere\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm = PluginManager()
    assert "dk_broken" not in {p.name for p in pm.plugins()}
    msg = " ".join(str(x.message) for x in w)
    assert "dk_broken" in msg and "decodekit-broken" in msg and "not_a_module_anywhere" in msg


def test_wrong_hook_signature_fails_at_load(tmp_path, monkeypatch):
    src = """
        from decodekit import hookimpl
        @hookimpl
        def decodekit_process_logits(state, scores):
            return scores
    """
    install(tmp_path, monkeypatch, "decodekit-wrongsig", "dk_wrongsig", src)
    with pytest.raises(PluginError) as e:
        PluginManager()
    assert "dk_wrongsig" in str(e.value) and "decodekit_process_logits" in str(e.value)


def test_misspelled_hook_fails_at_load(tmp_path, monkeypatch):
    src = """
        from decodekit import hookimpl
        @hookimpl
        def decodekit_proces_logits(state):
            return None
    """
    install(tmp_path, monkeypatch, "decodekit-typo", "dk_typo", src)
    with pytest.raises(PluginError) as e:
        PluginManager()
    assert "dk_typo" in str(e.value) and "decodekit_proces_logits" in str(e.value)


def test_per_token_hooks_are_plain_functions():
    import decodekit.hookspecs as hs

    pm = PluginManager(autoload=False)

    class P:
        @decodekit.hookimpl
        def decodekit_accept(self, state):
            pass

    p = P()
    pm.register(p, name="p")
    fns = pm.per_token("accept")
    assert [f for _, f in fns] == [p.decodekit_accept]  # bound method, no pluggy caller in between
    assert set(hs.PER_TOKEN_HOOKS) == {"pre_logits", "process_logits", "accept", "cache_update"}
