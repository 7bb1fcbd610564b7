"""Stateless processors: the distribution at a position depends only on that position's scores.

Every function takes scores ``[B, T, V]`` and per-row parameters ``[B, 1, 1]`` and returns new
scores; the formulas follow transformers' ``generation/logits_process.py`` line by line (so the
processed logits are identical, ties and ``-inf`` included), except where a comment says why not.
No ``.item()``/``.tolist()``/``nonzero()``: nothing here waits for the GPU.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import AfterValidator, Field, ValidationInfo, create_model

from decodekit import Processor
from decodekit.state import DecodeState
from decodekit import rng
from decodekit_samplers._params import per_row, positions, row_float, row_int
from decodekit_samplers._scan import vocab_cumsum

NEG_INF = float("-inf")

#: Salt of XTC's coin flips in :mod:`decodekit.rng` (distinct from the core's salts).
XTC_SALT = 0x1C


# ----------------------------------------------------------------------------- pure functions
def temperature(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return scores / t


def topk_values(scores: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """``torch.topk(scores, k).values``, in two stages on a GPU.

    torch.topk gives one thread block to each slice, so one 49,152-entry row (batch 1) runs on a
    single block: 52 µs on an H200, the chain's most expensive kernel after top-p's sort. Split
    into chunks, the top k of each chunk is computed in parallel and the top k of those candidates
    is the answer: the k largest values (as a multiset, ties included) are among them, since a
    chunk holds at most k of them. ``chunk`` None: two stages on CUDA for large rows, one elsewhere.
    """
    V = scores.shape[-1]
    if chunk is None:
        chunk = 1024 if scores.is_cuda else 0
    if not chunk or V < 4 * chunk or 4 * k > chunk:
        return torch.topk(scores, k).values
    n = -(-V // chunk)
    x = scores if n * chunk == V else torch.nn.functional.pad(scores, (0, n * chunk - V), value=NEG_INF)
    part = torch.topk(x.unflatten(-1, (n, chunk)), k).values  # [..., n, k]
    return torch.topk(part.flatten(-2), k).values


def top_k(scores: torch.Tensor, k: torch.Tensor | int, k_max: int) -> torch.Tensor:
    """Keep every token scoring at least the k-th best (ties with it survive, as in transformers)."""
    k_max = min(k_max, scores.shape[-1])
    best = topk_values(scores, k_max)  # [B, T, k_max]
    if isinstance(k, int):
        kth = best[..., k_max - 1 :]
    else:  # per-row k: the k-th best of row r is column k_r - 1 of the common top-k_max
        kth = best.gather(-1, (k.long().clamp(max=k_max) - 1).expand(*best.shape[:-1], 1))
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): drop the least likely tokens whose total mass is
    at most ``1 - p``."""
    sorted_logits, order = torch.sort(scores, descending=False)
    cum = vocab_cumsum(sorted_logits.softmax(-1))  # [B, T, V]; two levels, see _scan
    remove = cum <= (1 - p)
    remove[..., -min_keep:] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def min_p(scores: torch.Tensor, p: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """Keep tokens with probability >= p * p_max (Nguyen et al. 2024, arXiv 2407.01082)."""
    probs = scores.softmax(-1)
    remove = probs < p * probs.amax(-1, keepdim=True)
    if min_keep > 1:  # with one, the top token already survives (p <= 1): skip a topk kernel
        keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
        remove = remove.scatter(-1, keep, False)
    return scores.masked_fill(remove, NEG_INF)


def typical(scores: torch.Tensor, mass: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2023, arXiv 2202.00666): keep the tokens whose
    surprise is closest to the entropy, up to ``mass``. ``mass == 1`` keeps everything."""
    logp = torch.log_softmax(scores, -1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = (-logp - ent).abs()
    sorted_shift, order = torch.sort(shifted, descending=False)
    cum = vocab_cumsum(scores.gather(-1, order).softmax(-1))  # two levels, see _scan
    last = (cum < mass).sum(-1, keepdim=True).clamp_(max=scores.shape[-1] - 1)
    remove = sorted_shift > sorted_shift.gather(-1, last)
    remove[..., :min_keep] = False
    # transformers rejects mass == 1; here it is a per-row "off" switch, so make it exact.
    remove &= mass < 1
    return scores.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def _keep_top(remove: torch.Tensor, scores: torch.Tensor, min_keep: int) -> torch.Tensor:
    if min_keep == 1:  # the same value without a topk kernel (Inductor fuses amax)
        return remove & (scores < scores.amax(-1, keepdim=True))
    kth = torch.topk(scores, min(min_keep, scores.shape[-1])).values[..., -1:]
    return remove & (scores < kth)


def epsilon_cutoff(scores: torch.Tensor, eps: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens with probability < eps (Hewitt et al. 2022, arXiv 2210.15191)."""
    remove = _keep_top(scores.softmax(-1) < eps, scores, min_keep)
    return scores.masked_fill(remove, NEG_INF)


def eta_cutoff(scores: torch.Tensor, eps: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022): cutoff min(eps, sqrt(eps) * exp(-entropy))."""
    logp = torch.log_softmax(scores, -1)
    probs = logp.exp()
    # torch.distributions.Categorical.entropy clamps -inf log-probs to the dtype's min first.
    ent = -(logp.clamp(min=torch.finfo(logp.dtype).min) * probs).sum(-1, keepdim=True)
    eta = torch.minimum(eps, eps.sqrt() * torch.exp(-ent))
    remove = _keep_top(probs < eta, scores, min_keep)
    return scores.masked_fill(remove, NEG_INF)


def top_n_sigma(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Top-nσ (Tang et al. 2024, arXiv 2411.07641; llama.cpp ``top_n_sigma``): keep logits within
    n standard deviations of the maximum. Mean and (population) std over the finite logits only,
    as llama.cpp does, so masked tokens do not drag the statistics."""
    finite = torch.isfinite(scores)
    count = finite.sum(-1, keepdim=True).clamp_min(1)
    x = torch.where(finite, scores, 0.0)
    mean = x.sum(-1, keepdim=True) / count
    var = torch.where(finite, (scores - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
    cutoff = scores.amax(-1, keepdim=True) - n * var.sqrt()
    return scores.masked_fill(scores < cutoff, NEG_INF)


def xtc(scores: torch.Tensor, threshold: torch.Tensor, coin: torch.Tensor) -> torch.Tensor:
    """Exclude Top Choices (p-e-w, oobabooga text-generation-webui PR #6335; llama.cpp
    ``llama_sampler_xtc``): where ``coin`` is set and at least two tokens reach ``threshold``,
    drop all of them but the least likely one.

    Args:
        coin: ``[B, T, 1]`` bool, the per-position draw "apply XTC here".
    """
    probs = scores.softmax(-1)
    above = probs >= threshold
    weakest = torch.where(above, probs, float("inf")).amin(-1, keepdim=True)
    # llama.cpp keeps exactly one token at the boundary after its sort; tokens tied with the
    # weakest survivor are all kept here (no order-dependent choice among equals).
    remove = above & (probs > weakest) & (above.sum(-1, keepdim=True) >= 2) & coin
    return scores.masked_fill(remove, NEG_INF)


# ----------------------------------------------------------------------------- components
class _PerRow(Processor):
    """A processor whose float fields listed in ``rows`` may hold one value per row."""

    rows: ClassVar[tuple[str, ...]] = ()

    def setup(self, state: DecodeState) -> None:
        self._p = {f: per_row(self, f, state) for f in self.rows}


class Temperature(_PerRow):
    """Divide the scores by ``temperature`` (per row allowed)."""

    temperature: row_float(0, None, lo_open=True, hint="; for greedy decoding use the Greedy sampler instead") = 1.0
    rows: ClassVar = ("temperature",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return temperature(state.scores, self._p["temperature"])


class TopK(_PerRow):
    """Keep the ``top_k`` best tokens (ties with the k-th survive); per row allowed."""

    top_k: row_int(1) = 50
    min_tokens_to_keep: int = Field(1, ge=1)

    def setup(self, state: DecodeState) -> None:
        ks = self.top_k if isinstance(self.top_k, list) else [self.top_k]
        self._k_max = max(max(ks), self.min_tokens_to_keep)
        if isinstance(self.top_k, list):
            self._k = per_row(self, "top_k", state, torch.long).clamp(min=self.min_tokens_to_keep)
        else:
            self._k = self._k_max

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return top_k(state.scores, self._k, self._k_max)


class TopP(_PerRow):
    """Nucleus filtering: keep the most likely tokens up to mass ``top_p``; per row allowed."""

    top_p: row_float(0, 1, lo_open=True) = 1.0
    min_tokens_to_keep: int = Field(1, ge=1)
    rows: ClassVar = ("top_p",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return top_p(state.scores, self._p["top_p"], self.min_tokens_to_keep)


class MinP(_PerRow):
    """Keep tokens with probability at least ``min_p`` times the top token's; per row allowed."""

    min_p: row_float(0, 1) = 0.05
    min_tokens_to_keep: int = Field(1, ge=1)
    rows: ClassVar = ("min_p",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return min_p(state.scores, self._p["min_p"], self.min_tokens_to_keep)


class Typical(_PerRow):
    """Locally typical sampling with mass ``typical_p`` (1 = off); per row allowed."""

    typical_p: row_float(0, 1, lo_open=True) = 1.0
    min_tokens_to_keep: int = Field(1, ge=1)
    rows: ClassVar = ("typical_p",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return typical(state.scores, self._p["typical_p"], self.min_tokens_to_keep)


class EpsilonCutoff(_PerRow):
    """Drop tokens with probability below ``epsilon_cutoff`` (0 = off); per row allowed."""

    epsilon_cutoff: row_float(0, 1, hi_open=True) = 3e-4
    min_tokens_to_keep: int = Field(1, ge=1)
    rows: ClassVar = ("epsilon_cutoff",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return epsilon_cutoff(state.scores, self._p["epsilon_cutoff"], self.min_tokens_to_keep)


class EtaCutoff(_PerRow):
    """Eta sampling with ``eta_cutoff`` (0 = off); per row allowed."""

    eta_cutoff: row_float(0, 1, hi_open=True) = 3e-4
    min_tokens_to_keep: int = Field(1, ge=1)
    rows: ClassVar = ("eta_cutoff",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return eta_cutoff(state.scores, self._p["eta_cutoff"], self.min_tokens_to_keep)


class TopNSigma(_PerRow):
    """Keep logits >= max - ``top_n_sigma`` * std (llama.cpp's top-nσ); per row allowed."""

    top_n_sigma: row_float(0) = 1.0
    rows: ClassVar = ("top_n_sigma",)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return top_n_sigma(state.scores, self._p["top_n_sigma"])


class XTC(_PerRow):
    """Exclude Top Choices: with chance ``probability`` per position, drop every token with
    probability >= ``threshold`` except the least likely of them. The coin is drawn from
    :mod:`decodekit.rng` keyed by (row seed, position), so it needs no rollback and is the same
    when a position is verified again."""

    probability: row_float(0, 1) = 0.5
    threshold: row_float(0, 0.5, hint="; above 0.5 at most one token can qualify, so XTC would never act") = 0.1
    rows: ClassVar = ("probability", "threshold")

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        u = rng.uniform(state.seeds, positions(state), XTC_SALT).to(state.scores.device)  # [B, T]
        coin = (u[..., None] < self._p["probability"])  # [B, T, 1]
        return xtc(state.scores, self._p["threshold"], coin)


def _check_ids(v: dict[int, float], info: ValidationInfo) -> dict[int, float]:
    vocab = (info.context or {}).get("vocab_size")
    allowed = f"[0, {vocab})" if vocab is not None else "[0, vocab_size)"
    bad = [t for t in v if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ValueError(f"logit_bias token id(s) {bad[:5]} outside the vocabulary: ids must be in {allowed}")
    return v


_BiasIds = Annotated[dict[int, float], AfterValidator(_check_ids)]
# A plain pydantic model with the same field: validation context reaches it (Component's
# positional-value __init__ drops the context), so the vocabulary check is a pydantic error too.
_LogitBiasInVocab = create_model("LogitBias", logit_bias=(_BiasIds, ...))


class LogitBias(Processor):
    """Add ``logit_bias[token_id]`` to a token's score (OpenAI's ``logit_bias``; transformers'
    ``SequenceBiasLogitsProcessor`` with one-token sequences). ``-inf`` bans a token.

    Token ids are checked against the vocabulary once it is known (``setup``), or earlier with
    ``LogitBias.check_vocab(bias, vocab_size)``; both raise a pydantic ``ValidationError``."""

    logit_bias: _BiasIds

    @staticmethod
    def check_vocab(logit_bias: dict[int, float], vocab_size: int) -> None:
        _LogitBiasInVocab.model_validate({"logit_bias": logit_bias}, context={"vocab_size": vocab_size})

    def setup(self, state: DecodeState) -> None:
        self.check_vocab(self.logit_bias, state.vocab_size)
        bias = torch.zeros(state.vocab_size, dtype=torch.float32)
        ids = torch.tensor(list(self.logit_bias), dtype=torch.long)
        bias[ids] = torch.tensor(list(self.logit_bias.values()), dtype=torch.float32)
        self._bias = bias.to(state.device)

    def process_logits(self, state: DecodeState) -> torch.Tensor:
        return state.scores + self._bias.to(state.scores.dtype)
