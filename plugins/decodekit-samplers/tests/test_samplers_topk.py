"""The two-stage top-k (decodekit_samplers.filters.topk_values, used on CUDA) against torch.topk
itself, forced on the CPU: ties across chunk borders, -inf entries, a vocabulary that is not a
multiple of the chunk, fp32 and bf16, several rows and positions; and TopK's output through it
against transformers' TopKLogitsWarper."""

import pytest
import torch
from transformers import TopKLogitsWarper

from decodekit_samplers.filters import top_k, topk_values


def logits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    # few distinct values: many ties, also across chunk borders
    x = (x * 4).round() / 4
    x[..., ::7] = float("-inf")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [4096, 5000, 49152])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_two_stage_topk_equals_torch_topk(dtype, V, k):
    x = logits((3, 2, V), dtype, seed=V + k)
    want = torch.topk(x, k).values
    got = topk_values(x, k, chunk=256)
    assert torch.equal(got, want)


@pytest.mark.parametrize("k", [1, 20, 50])
def test_top_k_through_two_stages_matches_transformers(monkeypatch, k):
    import decodekit_samplers.filters as F

    real = F.topk_values
    monkeypatch.setattr(F, "topk_values", lambda s, kk, chunk=None: real(s, kk, chunk=256))
    x = logits((4, 1, 8192), torch.float32, seed=k)
    got = top_k(x, k, k)[:, 0]
    want = TopKLogitsWarper(top_k=k)(None, x[:, 0].clone())
    assert torch.equal(got, want)
