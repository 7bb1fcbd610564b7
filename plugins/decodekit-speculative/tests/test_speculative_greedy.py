"""Greedy with any drafter is token-identical to transformers' greedy generate (fp32), batch 1 and 4,
on llama (GQA), mistral (sliding window) and gemma3 (hybrid) tiny models, with every cache."""

import copy

import pytest
import torch

import decodekit
from decodekit import Processor, Strategy
from decodekit.testing import hf_greedy, tiny_model
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative

# Repetitive prompts so prompt lookup finds matches; tiny random models loop, so it finds more.
PROMPTS = ["the cat and the dog and the cat and the", "on and on and on", "hello there, is it the end", "a"]


def make_drafter(name, arch, drafts):
    if name == "lookup":
        return PromptLookup(ngram=3, min_ngram=1, k=5)
    if name == "draft-model":
        return DraftModel(model=drafts[arch], k=3)
    # adaptive exit starting at 0: random tiny models are unconfident, the threshold adapts from there
    return SelfSpeculative(skip_mlp=[1], k=3, adaptive=True, threshold=0.0)


DRAFTERS = ["lookup", "draft-model", "self-spec"]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_identity_llama(models, drafts, tok, oracle, make_cache, batch, name):
    n = 20
    drafter = make_drafter(name, "llama", drafts)
    got = decodekit.generate(models["llama"], tok, PROMPTS[:batch], Strategy(cache=make_cache(), drafter=drafter, stop_at_eos=False), max_new_tokens=n)
    assert got.token_ids == oracle("llama", PROMPTS[:batch], n)
    assert got.stats["new_tokens"] == n * batch
    assert got.stats["drafted"] > 0
    assert got.stats["forward_passes"] <= n


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_identity_sliding_window_batch4(models, drafts, tok, oracle, make_cache, arch, name):
    """Ragged acceptance leaves holes; the sliding window must still cover 8 *positions*."""
    n = 20  # past the sliding window (8) of the tiny mistral/gemma3
    drafter = make_drafter(name, arch, drafts)
    got = decodekit.generate(models[arch], tok, PROMPTS, Strategy(cache=make_cache(), drafter=drafter, stop_at_eos=False), max_new_tokens=n)
    assert got.token_ids == oracle(arch, PROMPTS, n)
    assert got.stats["drafted"] > 0


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_identity_sliding_window_batch1(models, drafts, tok, oracle, arch, name):
    n = 20
    drafter = make_drafter(name, arch, drafts)
    got = decodekit.generate(models[arch], tok, PROMPTS[:1], Strategy(drafter=drafter, stop_at_eos=False), max_new_tokens=n)
    assert got.token_ids == oracle(arch, PROMPTS[:1], n)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_draft_equal_to_target_accepts_everything(models, tok, oracle, make_cache, arch):
    n = 20
    drafter = DraftModel(model=models[arch], k=4)
    got = decodekit.generate(models[arch], tok, PROMPTS, Strategy(cache=make_cache(), drafter=drafter, stop_at_eos=False), max_new_tokens=n)
    assert got.token_ids == oracle(arch, PROMPTS, n)
    assert got.stats["acceptance_rate"] == 1.0
    assert got.stats["forward_passes"] == n // 5  # k + 1 tokens per target pass
    assert got.stats["mean_accepted_length"] == 5.0


def test_self_speculative_with_nothing_skipped_accepts_everything(models, tok, oracle):
    got = decodekit.generate(models["llama"], tok, PROMPTS, Strategy(drafter=SelfSpeculative(k=3, adaptive=False), stop_at_eos=False), max_new_tokens=20)
    assert got.stats["acceptance_rate"] == 1.0
    assert got.stats["forward_passes"] == 5
    assert got.stats["draft_forward_passes"] == 15
    assert got.token_ids == oracle("llama", PROMPTS, 20)


class Record(Processor):
    """Records what the target verifies each step (committed prefix, proposals, their count)."""

    log: list = []

    def process_logits(self, state):
        self.log.append((state.committed_ids().clone(), state.proposals.clone(), state.n_proposed.clone()))
        return None


@pytest.mark.parametrize("batch", [1, 4])
def test_draft_cache_mirrors_a_fresh_recompute(models, tok, batch):
    """Every greedy draft equals the draft model's own greedy continuation of the committed prefix,
    recomputed from scratch by transformers: the draft cache survives ragged acceptance and holes."""
    target, draft_model = models["llama"], tiny_model("llama", seed=2)  # seed 2 agrees often enough to accept some
    rec = Record(log=[])
    decodekit.generate(target, tok, PROMPTS[:batch], Strategy(processors=[rec], drafter=DraftModel(model=draft_model, k=3), stop_at_eos=False), max_new_tokens=16)
    checked = 0
    for committed, proposals, n in rec.log:
        for r in range(batch):
            ids = [t for t in committed[r].tolist()]
            # strip left padding (pad id 0 never appears in the tiny models' prompts)
            while ids and ids[0] == tok.pad_token_id:
                ids.pop(0)
            m = int(n[r])
            if m == 0:
                continue
            out = draft_model.generate(torch.tensor([ids]), max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=0)
            assert proposals[r, :m].tolist() == out[0, len(ids):].tolist()
            checked += 1
    assert checked >= 5


def test_skipping_equals_zeroed_sublayers(models, tok):
    """The bypass is exactly 'the sublayer outputs zero': compare with a copy whose skipped
    sublayers' output projections are zero. Also the target is untouched afterwards."""
    model = models["llama"]
    zeroed = copy.deepcopy(model)
    zeroed.model.layers[0].self_attn.o_proj.weight.data.zero_()
    zeroed.model.layers[1].mlp.down_proj.weight.data.zero_()
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    before = model(ids).logits
    from decodekit_speculative import skipping

    with skipping(model, [0], [1]):
        skipped = model(ids).logits
    assert torch.allclose(skipped, zeroed(ids).logits, atol=1e-5)
    assert not torch.allclose(skipped, before, atol=1e-3)
    assert torch.equal(model(ids).logits, before)  # forward restored
    with pytest.raises(RuntimeError):
        with skipping(model, [0], [1]):
            raise RuntimeError("boom")
    assert "forward" not in vars(model.model.layers[0].self_attn)

    # and the drafts SelfSpeculative makes are the zeroed copy's greedy drafts
    def proposals(drafter):
        rec = Record(log=[])
        decodekit.generate(model, tok, PROMPTS, Strategy(processors=[rec], drafter=drafter, stop_at_eos=False), max_new_tokens=12)
        return [(p.tolist(), n.tolist()) for _, p, n in rec.log]

    assert proposals(SelfSpeculative(skip_attention=[0], skip_mlp=[1], k=3, adaptive=False)) == proposals(DraftModel(model=zeroed, k=3))
