import pytest
import torch

import decodekit
from decodekit.testing import tiny_model, tiny_tokenizer


# Tiny models run fastest on one thread, and two threads stall badly on a shared 2-core box.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session", params=["llama", "mistral", "gemma3"])
def arch_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct (converted once and cached)."""
    return decodekit.load_model()


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    # Each test sees the plugins installed in the environment, loaded afresh.
    decodekit.reset_plugin_manager()
    yield
    decodekit.reset_plugin_manager()
