import pytest
import torch

import decodekit
from decodekit.testing import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _only_kvcache(monkeypatch):
    # Other plugins of the repo may be mid-work; these tests load this plugin alone.
    monkeypatch.setenv("DECODEKIT_PLUGINS", "kvcache")
    monkeypatch.delenv("DECODEKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    decodekit.reset_plugin_manager()
    yield
    decodekit.reset_plugin_manager()


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def models():
    return {arch: tiny_model(arch) for arch in ("llama", "mistral", "gemma3")}


class SelfDrafter(decodekit.Drafter):
    """A real drafter for tests: proposes the model's own greedy continuation (recomputed without
    a cache), corrupted after a row- and step-dependent number of tokens, so rows accept ragged
    amounts and leave holes."""

    k: int = 3

    def pre_logits(self, state):
        model, B = state.model, state.batch_size
        ids = state.committed_ids()                                   # [B, L] left-padded
        L = ids.shape[1]
        mask = torch.arange(L)[None] >= (L - state.committed)[:, None]
        out = []
        with torch.no_grad():
            for _ in range(self.k):
                pos = (mask.long().cumsum(1) - 1).clamp_min(0)
                nxt = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits[:, -1].argmax(-1)
                out.append(nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], 1)
        drafts = torch.stack(out, 1)                                  # [B, k]
        good = (torch.arange(B) + state.step) % (self.k + 1)          # correct proposals per row
        bad = torch.arange(self.k)[None] >= good[:, None]
        drafts = torch.where(bad, (drafts + 1) % state.vocab_size, drafts)
        return decodekit.Proposal(tokens=drafts)


class Backtrack(decodekit.Processor):
    """Un-commits ``depth`` tokens of every row every ``every`` steps (as an FSM or stop-string
    handler would): greedy regenerates the same tokens, so the output must not change."""

    every: int = 4
    depth: int = 2

    def setup(self, state):
        self._asked = -1

    def process_logits(self, state):
        return None

    def accept(self, state):
        if state.step % self.every == self.every - 1 and self._asked != state.step:
            self._asked = state.step
            state.request_rollback(torch.full((state.batch_size,), self.depth))


def hf_greedy(model, tok, prompts, n):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return [row.tolist() for row in out[:, enc.input_ids.shape[1]:]]


@pytest.fixture(scope="session")
def kv():
    """Test helpers (fixtures, since --import-mode=importlib cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(SelfDrafter=SelfDrafter, Backtrack=Backtrack, hf_greedy=hf_greedy)
