"""The compiled static path (issue #6): drafts run through a preallocated KV store and compiled
fixed-shape passes, the target through a compiled StaticCache step. Checked on CPU with
``compile_backend="eager"`` (dynamo traces every graph, no code generation): greedy stays
token-identical to transformers' greedy, drafts equal a fresh recompute, and the number of traced
graphs is fixed (no recompiles per step, none for a second generation)."""

import copy

import pytest
import torch
import torch._dynamo.utils

import decodekit
from decodekit import Processor, Strategy
from decodekit.testing import tiny_model
from decodekit_speculative import DraftModel, PromptLookup, SelfSpeculative
from decodekit_speculative.self_speculative import skipped_view

PROMPTS = ["the cat and the dog and the cat and the", "on and on and on", "hello there, is it the end", "a"]
N = 40


def compiled_static():
    return {"name": "StaticCache", "compile": True, "compile_backend": "eager"}


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def make(name, arch):
    if name == "lookup":
        return PromptLookup(ngram=3, k=5, fixed_width=True)
    if name == "draft-model":
        return DraftModel(model=tiny_model(arch, seed=2), k=3)
    return SelfSpeculative(skip_mlp=[1], k=3, adaptive=True, threshold=0.0)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["lookup", "draft-model", "self-spec"])
def test_compiled_static_path_is_exact_and_traces_a_fixed_number_of_graphs(models, tok, oracle, batch, name):
    prompts = PROMPTS[:batch]
    drafter = make(name, "llama")
    before = graphs()
    got = decodekit.generate(models["llama"], tok, prompts, Strategy(cache=compiled_static(), drafter=drafter, stop_at_eos=False), max_new_tokens=N)
    assert got.token_ids == oracle("llama", prompts, N)
    s = got.stats
    # every step after the (eager) prefill ran the compiled target step, with one verify width
    assert s["compiled_steps"] == s["forward_passes"] - 1
    traced = graphs() - before
    if name == "lookup":
        # one target graph, one proposal graph and one verify + commit graph (none if an earlier
        # test traced these shapes)
        assert traced <= 3
        assert drafter._compiled is not None  # beside a compiled target the proposal is compiled too
    else:
        # the drafter always proposes k, and every draft pass is compiled but the eager prefills:
        # the first step's and one after each compaction of the target's slots (the compiled
        # target keeps rejected drafts as holes and compacts when they fill its buffer)
        assert s["draft_prefills"] == 1 + s["compactions"]
        assert s["draft_compiled_passes"] == s["draft_forward_passes"] - s["draft_prefills"]
        assert traced <= 4  # target T=bucket(1+k); draft passes of 2 and 1 queries; verify + commit
    # a second generation reuses every graph
    before = graphs()
    again = decodekit.generate(models["llama"], tok, prompts, Strategy(cache=compiled_static(), drafter=drafter, stop_at_eos=False), max_new_tokens=N)
    assert again.token_ids == got.token_ids
    assert graphs() == before


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_compiled_draft_equal_to_target_accepts_everything(models, tok, oracle, arch):
    """The strongest check of the mirror: a draft that *is* the target must agree on every token,
    which fails if any cached draft slot is missing or stale (mistral: sliding ring past the
    window of 8). Batch 4 with uneven prompts: padding and holes."""
    drafter = DraftModel(model=models[arch], k=4, compile=True, compile_backend="eager")
    got = decodekit.generate(models[arch], tok, PROMPTS, Strategy(drafter=drafter, stop_at_eos=False), max_new_tokens=N)
    assert got.token_ids == oracle(arch, PROMPTS, N)
    assert got.stats["acceptance_rate"] == 1.0
    assert got.stats["forward_passes"] == N // 5


class Record(Processor):
    log: list = []

    def process_logits(self, state):
        self.log.append((state.committed_ids().clone(), state.proposals.clone(), state.n_proposed.clone()))
        return None


def test_compiled_drafts_equal_a_fresh_recompute(models, tok):
    """Every compiled self-speculative draft equals the greedy continuation, recomputed from scratch
    by transformers, of a copy of the target whose skipped MLP is zeroed (ragged acceptance at
    batch 4: holes, catch-up slots, trims)."""
    model = models["llama"]
    zeroed = copy.deepcopy(model)
    zeroed.model.layers[1].mlp.down_proj.weight.data.zero_()
    rec = Record(log=[])
    drafter = SelfSpeculative(skip_mlp=[1], k=3, adaptive=False, compile=True, compile_backend="eager")
    out = decodekit.generate(model, tok, PROMPTS, Strategy(processors=[rec], drafter=drafter, stop_at_eos=False), max_new_tokens=16)
    assert 0 < out.stats["acceptance_rate"] < 1  # partial acceptance: the mirror is exercised
    checked = 0
    for committed, proposals, n in rec.log:
        for r in range(len(PROMPTS)):
            ids = committed[r].tolist()
            while ids and ids[0] == tok.pad_token_id:
                ids.pop(0)
            m = int(n[r])
            if m == 0:
                continue
            ref = zeroed.generate(torch.tensor([ids]), max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=0)
            assert proposals[r, :m].tolist() == ref[0, len(ids):].tolist()
            checked += 1
    assert checked >= 10


def test_skipped_view_shares_weights_and_leaves_the_target_alone(models, tok):
    model = models["llama"]
    zeroed = copy.deepcopy(model)
    zeroed.model.layers[0].self_attn.o_proj.weight.data.zero_()
    zeroed.model.layers[1].mlp.down_proj.weight.data.zero_()
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    before = model(ids).logits
    view = skipped_view(model, (0,), (1,))
    assert view is skipped_view(model, (0,), (1,))  # cached: compiled graphs are reused
    assert torch.allclose(view(ids).logits, zeroed(ids).logits, atol=1e-5)
    assert torch.equal(model(ids).logits, before)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in view.parameters())  # nothing copied
    assert sum(1 for _ in view.parameters()) < sum(1 for _ in model.parameters())  # skipped ones absent


def test_fixed_width_prompt_lookup_matches_variable_width(models, tok):
    """Fixed-width proposals (no host sync) commit exactly what variable-width ones do."""
    out = {}
    for fixed in (False, True):
        d = PromptLookup(ngram=3, k=5, fixed_width=fixed)
        out[fixed] = decodekit.generate(models["llama"], tok, PROMPTS, Strategy(drafter=d, stop_at_eos=False), max_new_tokens=24)
    assert out[True].token_ids == out[False].token_ids
    assert out[True].stats["accepted"] == out[False].stats["accepted"]


@pytest.mark.parametrize("name", ["draft-model", "self-spec"])
def test_draft_buffers_go_back_when_the_generation_ends(models, tok, oracle, name):
    """A fresh strategy per call, no garbage collection in between: the next generation's target
    and draft stores get the same addresses (on a GPU their CUDA graphs then replay instead of
    re-recording), and the output stays exact."""
    from decodekit_kvcache.testing import without_garbage_collector

    model = models["llama"]
    draft_model = tiny_model("llama", seed=2)
    with without_garbage_collector():
        seen, outs = [], []
        for _ in range(2):
            drafter = DraftModel(model=draft_model, k=3) if name == "draft-model" else make(name, "llama")
            s = Strategy(cache=compiled_static(), drafter=drafter, stop_at_eos=False)
            outs.append(decodekit.generate(model, tok, PROMPTS[:2], s, max_new_tokens=N).token_ids)
            net = drafter._net.store
            seen.append(([t.data_ptr() for t in net.keys if t is not None], [t.data_ptr() for t in s.cache._store.keys if t is not None]))
            del s, drafter
    assert seen[0] == seen[1]
    assert outs[0] == outs[1] == oracle("llama", PROMPTS[:2], N)
