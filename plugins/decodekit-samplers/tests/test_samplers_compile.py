"""The sampler chain inside the compiled decode step: the two-level vocabulary scan against ATen's
cumsum and transformers' processors at real vocabulary sizes, every component traced as one graph
with no scan Inductor would split, and a whole generation compiled by Inductor (CPU C++ backend)
giving the eager path's tokens."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.generation import logits_process as hf

import decodekit
import decodekit_samplers as S
from decodekit.state import DecodeState
from decodekit_samplers import filters as F
from decodekit_samplers._scan import NO_SPLIT_MAX, SCAN_CHUNK, two_level_cumsum, vocab_cumsum


def logits_with_ties(B: int, V: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[B, V] float32 logits with exact ties (a coarse grid / bf16 rounding), ~10% -inf, and the
    last row entirely -inf (softmax gives NaN there: both sides must keep every score)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        x = (torch.randn(B, V, generator=g) * 6).round() / 2
    else:
        x = (torch.randn(B, V, generator=g) * 4).to(dtype).float()
    x[torch.rand(B, V, generator=g) < 0.1] = float("-inf")
    x[-1] = float("-inf")
    return x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN in the same places."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# ------------------------------------------------------------------------------ the two-level scan
@pytest.mark.parametrize("V", [1, 5, SCAN_CHUNK - 1, SCAN_CHUNK, SCAN_CHUNK + 1, 3001, 49152])
def test_two_level_cumsum_equals_aten_cumsum(V):
    # ATen's CPU cumsum of float32 accumulates in double; the two-level scan accumulates in
    # float64 too, so the rounded results must be identical, not just close.
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, 2, V, generator=g).softmax(-1)
    x[0, 1] = float("nan")  # a NaN row (softmax of all -inf) stays NaN
    assert same(two_level_cumsum(x), x.cumsum(-1))


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_two_level_cumsum_any_chunk_length(chunk):
    """Vocabulary sizes that do not divide into chunks: the zero padding never leaks."""
    g = torch.Generator().manual_seed(chunk)
    x = torch.rand(4, 300, generator=g)
    x[1, 150] = float("nan")  # a NaN mid-row poisons exactly the prefixes after it, as in ATen
    assert same(two_level_cumsum(x, chunk), x.cumsum(-1))


def test_two_level_cumsum_refuses_too_many_chunks():
    with pytest.raises(ValueError, match=r"raise chunk so V / chunk <= 8192"):
        two_level_cumsum(torch.zeros(1, 8193 * 2), chunk=2)


def test_vocab_cumsum_uses_two_levels_when_compiled():
    """Eager CPU takes ATen's cumsum (identical, faster); a compiled graph gets the two levels."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.rand(2, 3000).softmax(-1)
    seen = []

    def backend(gm, inputs):
        seen.extend(n.args[0].meta["example_value"].shape[-1] for n in gm.graph.nodes if "cumsum" in str(n.target))
        return gm

    torch._dynamo.reset()
    assert same(torch.compile(vocab_cumsum, backend=backend, fullgraph=True)(x), x.cumsum(-1))
    assert seen and max(seen) <= SCAN_CHUNK
    eager = make_fx(lambda v: vocab_cumsum(v))(x).graph
    assert [n.args[0].meta["val"].shape[-1] for n in eager.nodes if "cumsum" in str(n.target)] == [3000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [3001, 49152])
def test_scanning_filters_match_transformers_at_vocab_size(V, dtype):
    """TopP and Typical (the two processors that scan the sorted vocabulary) against transformers
    at SmolLM2's vocabulary and at one that does not divide into chunks."""
    ids = torch.zeros(4, 1, dtype=torch.long)
    x = logits_with_ties(4, V, dtype, seed=V)
    for p in [0.05, 0.5, 0.9, 0.999]:
        want = hf.TopPLogitsWarper(p)(ids, x.clone())
        assert same(F.top_p(x[:, None].clone(), torch.full((4, 1, 1), p))[:, 0], want), ("top_p", p)
        want = hf.TypicalLogitsWarper(p)(ids, x.clone())
        assert same(F.typical(x[:, None].clone(), torch.full((4, 1, 1), p))[:, 0], want), ("typical", p)


# ------------------------------------------------------------------------------ one graph, no long scan
class _Tok:
    """DRY tokenizes its string sequence breakers; any ids do for tracing."""

    def encode(self, s, add_special_tokens=False):
        return [ord(c) % 1000 for c in s]


def _state(B: int, T: int, V: int) -> DecodeState:
    g = torch.Generator().manual_seed(0)
    H = 24
    st = DecodeState(model=None, tokenizer=_Tok(), device=torch.device("cpu"), batch_size=B, vocab_size=V,
                     prompt_ids=torch.randint(0, V, (B, H), generator=g).tolist(), prompt_lengths=torch.full((B,), H),
                     seeds=torch.arange(B), max_new_tokens=8, eos_token_ids=torch.tensor([2]), pad_token_id=0)
    st.committed, st.n_new = torch.full((B,), H), torch.zeros(B, dtype=torch.long)
    st.proposals, st.proposal = torch.randint(0, V, (B, T - 1), generator=g), None
    st.scores = torch.randn(B, T, V, generator=g) * 3
    return st


def every_component():
    return [S.RepetitionPenalty(1.2), S.PresencePenalty(0.5), S.FrequencyPenalty(0.5), S.NoRepeatNGram(2),
            S.LogitBias({3: 1.0}), S.DRY(), S.Temperature([0.7, 1.3]), S.TopK([40, 5]), S.TopP([0.9, 0.5]),
            S.MinP(0.05), S.Typical(0.9), S.EpsilonCutoff(1e-4), S.EtaCutoff(1e-4), S.TopNSigma(2.0),
            S.XTC(probability=1.0), S.Mirostat()]


def _runner(comps: list, state: DecodeState):
    """scores [B, T, V] -> every processor in turn, then the sampler's tokens: one function of one
    tensor (compiled whole, so any graph break anywhere fails ``fullgraph=True``)."""
    *procs, sampler = comps

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state.scores = x
        for p in procs:
            state.scores = p.process_logits(state)
        return state.scores, sampler.sample(state)[0]

    return run


SCANS = ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")


@pytest.mark.parametrize("T", [1, 3], ids=["plain", "verify3"])
def test_every_component_is_one_graph_without_long_scans(T):
    """Every processor in a row, then Multinomial, at SmolLM2's vocabulary (plain step and a
    3-position verify): dynamo captures it whole (``fullgraph=True`` raises on any graph break, data-dependent
    shape or host sync) with the eager result, and the aten graph Inductor would lower (after its
    own decompositions; traced as compiled code, where ``vocab_cumsum`` takes two levels) holds no
    scan longer than Inductor keeps in one program."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    V = 49152
    comps = every_component() + [S.Multinomial()]
    state = _state(2, T, V)
    for c in comps:
        c.setup(state)
    run = _runner(comps, state)
    scores = state.scores.clone()
    want = run(scores.clone())
    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True, backend="eager")(scores.clone())
    assert same(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.isfinite(want[0]).sum(-1).min() >= 1  # the chain leaves something to sample

    graphs = []

    def keep(gm, inputs):
        graphs.append(gm.graph)
        return make_boxed_func(gm.forward)

    # Inductor's decompositions may round differently (softmax as exp / sum): shapes only.
    torch._dynamo.reset()
    torch.compile(run, fullgraph=True, backend=aot_autograd(fw_compiler=keep, decompositions=select_decomp_table()))(scores.clone())
    assert len(graphs) == 1
    scans = [n for n in graphs[0].nodes if n.op == "call_function" and any(s in str(n.target) for s in SCANS)]
    assert scans  # top-p, typical, DRY scan: the check below is not vacuous
    for node in scans:
        shape, dim = node.args[0].meta["val"].shape, node.args[1]
        assert shape[dim] <= NO_SPLIT_MAX, (str(node.target), tuple(shape), dim)


# ------------------------------------------------------------------------------ Inductor, whole generation
def test_chain_compiles_with_inductor_and_equals_eager_tokens():
    """The issue's chain inside StaticCache's compiled decode step, real Inductor lowering and
    codegen (the CPU C++ backend: proves tracing and lowering, not Triton): one graph, no
    fallback, no recompile, and the eager step's tokens for the same seed (the RNG is
    counter-based, so sampling is deterministic). Vocabulary 2,600: three scan chunks, the last
    one partial."""
    from torch._dynamo.utils import counters

    from decodekit.testing import tiny_model, tiny_tokenizer

    decodekit.reset_plugin_manager()
    if "StaticCache" not in decodekit.get_plugin_manager().components:
        pytest.skip("decodekit-kvcache is not installed")
    model, tok = tiny_model("llama", vocab_size=2600, num_hidden_layers=1), tiny_tokenizer()
    prompts = ["hello there the", "a"]

    def chain():
        return [S.RepetitionPenalty(1.3), S.Temperature([0.8, 1.2]), S.TopK(1000), S.TopP(0.9), S.MinP(0.02)]

    out = {}
    counters.clear()
    for name, cache in [("eager", {"name": "StaticCache", "compile": False}),
                        ("inductor", {"name": "StaticCache", "compile": True, "compile_backend": "inductor"})]:
        strategy = decodekit.Strategy(cache=cache, processors=chain(), sampler=S.Multinomial(), stop_at_eos=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="decodekit StaticCache")  # the fallback warning
            res = decodekit.generate(model, tok, prompts, strategy, max_new_tokens=10, seed=3)
        out[name] = res.token_ids
    assert res.stats["compiled_steps"] == 9 and "compile_fallback" not in res.stats  # prefill is eager
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1
    assert out["inductor"] == out["eager"]
    assert len(set(map(tuple, out["eager"]))) == 2  # the rows differ (a sampler, not a constant)


def test_counting_penalties_do_not_recompile_for_another_length():
    """The counting penalties read the new tokens through a power-of-two-wide buffer, so the
    compiled step does not specialise on ``max_new_tokens`` (the loop's ``out_tokens`` is exactly
    ``max_new_tokens + 1`` wide): two generations of different lengths share one graph, and give
    the eager step's tokens."""
    from torch._dynamo.utils import counters

    from decodekit.testing import tiny_model, tiny_tokenizer

    decodekit.reset_plugin_manager()
    if "StaticCache" not in decodekit.get_plugin_manager().components:
        pytest.skip("decodekit-kvcache is not installed")
    model, tok = tiny_model("llama", vocab_size=600, num_hidden_layers=1), tiny_tokenizer()

    def run(n: int, compiled: bool):
        cache = {"name": "StaticCache", "compile": compiled, "compile_backend": "eager", "max_len": 64}
        procs = [S.RepetitionPenalty(1.5), S.FrequencyPenalty(0.4), S.PresencePenalty(0.3)]
        strategy = decodekit.Strategy(cache=cache, processors=procs, sampler=S.Multinomial(), stop_at_eos=False)
        return decodekit.generate(model, tok, ["the cat and the cat", "a b a b"], strategy, max_new_tokens=n, seed=5)

    torch._dynamo.reset()
    counters.clear()
    for n in (9, 14):
        res = run(n, True)
        assert res.stats["compiled_steps"] == n - 1 and "compile_fallback" not in res.stats
        assert res.token_ids == run(n, False).token_ids
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1
