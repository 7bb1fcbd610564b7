"""Fixtures for decodekit-speculative's tests (tiny random models, no downloads)."""

import pytest
import torch

import decodekit
from decodekit import NoCache, Sampler, rng
from decodekit.testing import tiny_model, tiny_tokenizer


class HFDynamic(decodekit.Cache):
    """Test-only target cache: transformers' DynamicCache with full layers, cropped to the slot
    count (``decodekit.testing.hf_dynamic_cache_component`` builds sliding layers from the config,
    which drop keys a rollback needs). Replaced by decodekit-kvcache's caches once installed."""

    def setup(self, state):
        super().setup(state)
        from transformers import DynamicCache

        self._pkv = DynamicCache()

    def past_key_values(self):
        return self._pkv

    def cache_update(self, state):
        extra = self._pkv.get_seq_length() - state.n_slots
        if extra > 0:
            self._pkv.crop(-extra)
        self._seen = min(self._seen, state.n_slots)


def cache_factories():
    """Every target cache the drafters must work with: the core's NoCache and decodekit-kvcache's
    DynamicCache and StaticCache (a transformers DynamicCache wrapper until that plugin is installed)."""
    try:
        import decodekit_kvcache as kv
    except ImportError:
        return [("NoCache", NoCache), ("HFDynamic", HFDynamic)]
    return [("NoCache", NoCache), ("DynamicCache", kv.DynamicCache), ("StaticCache", lambda: kv.StaticCache(max_len=128))]


class SeededMultinomial(Sampler):
    """Sampling through the core's counter-based RNG at the positions verify uses; the reference
    sampler until decodekit-samplers' Multinomial is installed."""

    def sample(self, state):
        T = state.scores.shape[1]
        pos = state.committed[:, None] + torch.arange(T, device=state.device)
        return rng.sample(state.scores, state.seeds, pos), torch.softmax(state.scores, -1)


def multinomial():
    try:
        from decodekit_samplers import Multinomial
    except ImportError:
        return SeededMultinomial()
    return Multinomial()


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def models():
    """Targets (seed 0) and unrelated drafts (seed 1) per architecture."""
    return {arch: tiny_model(arch) for arch in ("llama", "mistral", "gemma3")}


@pytest.fixture(scope="session")
def drafts():
    return {arch: tiny_model(arch, seed=1) for arch in ("llama", "mistral", "gemma3")}


@pytest.fixture(scope="session")
def oracle(models, tok):
    """transformers' greedy generate, memoised: ``oracle(arch, prompts, n)``."""
    from decodekit.testing import hf_greedy

    memo = {}

    def get(arch, prompts, n):
        key = (arch, tuple(prompts), n)
        if key not in memo:
            memo[key] = hf_greedy(models[arch], tok, list(prompts), n)
        return memo[key]

    return get


@pytest.fixture(autouse=True)
def _no_grad_fresh_plugins(request):
    # Tiny models run fastest on one thread (and the 2-core box is shared); real-model tests keep all.
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("real_model") is None:
        torch.set_num_threads(1)
    decodekit.reset_plugin_manager()
    with torch.no_grad():
        yield
    decodekit.reset_plugin_manager()
    torch.set_num_threads(threads)


_CACHES = dict(cache_factories())


@pytest.fixture(params=list(_CACHES))
def make_cache(request):
    """A factory of one target cache (parametrised over every cache available)."""
    return _CACHES[request.param]


@pytest.fixture
def sampler():
    """A fresh sampling sampler (the samplers plugin's Multinomial when installed)."""
    return multinomial
