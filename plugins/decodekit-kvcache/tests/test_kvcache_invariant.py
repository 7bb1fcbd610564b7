"""The cache invariant, checked after every step against a fresh recompute by transformers:
full layers hold exactly each row's committed tokens minus the last (holes masked), rings hold the
last ``window`` of them, and the logits of every step (after rollbacks too) equal a recompute."""

import pytest
import torch
from transformers import DynamicCache as HFDynamicCache

import decodekit
from decodekit.components import cache_kwarg
from decodekit.loop import prepare, run
from decodekit_kvcache.layout import FULL

PROMPTS = ["hello there the", "a", "the cat is on it and the dog"]


class RecomputeCheck(decodekit.Processor):
    """Compares this step's raw logits at every verified position with a fresh full forward of
    the same prefix (no cache); records the worst difference."""

    def setup(self, state):
        self._worst = 0.0

    def process_logits(self, state):
        ids = torch.cat([state.committed_ids(), state.proposals], 1)  # [B, L+k]
        L, T = ids.shape[1], state.num_positions
        mask = torch.arange(L)[None] >= (L - state.committed - (T - 1))[:, None]
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            fresh = state.model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits[:, -T:]
        live = ~state.finished
        self._worst = max(self._worst, float((fresh - state.scores).abs()[live].max()) if live.any() else 0.0)
        return None


def _fresh_kv(model, ids):
    with torch.no_grad():
        pkv = HFDynamicCache()  # full layers: every position kept, the oracle for rings too
        model(input_ids=torch.tensor([ids]), **{cache_kwarg(model): pkv}, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in pkv.layers]  # [H, n, D] each


def _check_store(model, state, cache):
    store = cache._store
    assert cache._seen == state.n_slots
    for r in range(state.batch_size):
        slots = state.valid[r].nonzero()[:, 0]
        ids = state.tokens[r, slots].tolist()               # committed minus last, holes squeezed out
        n = int(state.committed[r]) - 1
        assert len(ids) == n and state.tokens.shape[1] <= store.capacity
        if n == 0:
            continue
        fresh = _fresh_kv(model, ids)
        for layer, (k, v) in enumerate(fresh):
            K, V = store.keys[layer][r], store.values[layer][r]
            if store.layout.kinds[layer] == FULL:
                torch.testing.assert_close(K[:, slots], k, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(V[:, slots], v, atol=1e-4, rtol=1e-4)
            else:  # the ring: the last window-1 positions the next query attends to
                p = torch.arange(max(0, n - store.layout.window + 1), n)
                assert store.ring_pos[r, p % store.ring].tolist() == p.tolist()
                torch.testing.assert_close(K[:, p % store.ring], k[:, p], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(V[:, p % store.ring], v[:, p], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("cache_cls", ["DynamicCache", "StaticCache"])
def test_cache_holds_committed_minus_last_and_logits_equal_recompute(models, tok, kv, arch, cache_cls):
    model = models[arch]
    pm = decodekit.get_plugin_manager()
    # StaticCache sized tight so ragged holes force compaction of the slot buffer and cache.
    cache = pm.component(cache_cls)(max_rollback=2, **({"max_len": 35} if cache_cls == "StaticCache" else {}))
    check = RecomputeCheck()
    strategy = decodekit.Strategy(cache=cache, processors=[check, kv.Backtrack(every=3, depth=2)],
                                  drafter=kv.SelfDrafter(k=3), stop_at_eos=False)
    state, strategy = prepare(model, tok, PROMPTS, strategy, max_new_tokens=16)
    holes = 0
    for st in run(state, strategy):
        holes = max(holes, int((~st.valid).sum()))
        _check_store(model, st, cache)
    assert holes > 0, "the drafter should have left ragged holes"
    assert check._worst < 1e-4
    if cache_cls == "StaticCache":
        assert state.extras["stats"]["compactions"] > 0


def test_rollback_deeper_than_ring_fails_loudly(models, tok, kv):
    # max_rollback=0 keeps no room beyond this step's proposals: a 2-token rollback must be refused.
    strategy = decodekit.Strategy(cache="DynamicCache", processors=[kv.Backtrack(every=3, depth=2)])
    with pytest.raises(decodekit.DecodekitError, match=r"max_rollback=\d+"):
        decodekit.generate(models["mistral"], tok, "hello there the cat", strategy, max_new_tokens=12)
    # ...and with the room asked for it is fine (and still equal to generate).
    strategy = decodekit.Strategy(cache={"name": "DynamicCache", "max_rollback": 2}, processors=[kv.Backtrack(every=3, depth=2)])
    out = decodekit.generate(models["mistral"], tok, "hello there the cat", strategy, max_new_tokens=12)
    ref = kv.hf_greedy(models["mistral"], tok, ["hello there the cat"], 12)[0]
    assert out.token_ids[0] == (ref[: ref.index(2) + 1] if 2 in ref else ref)
