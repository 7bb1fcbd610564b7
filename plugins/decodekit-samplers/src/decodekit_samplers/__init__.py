"""decodekit-samplers: every sampler and penalty users know from transformers and llama.cpp,
batched (per-row parameters), seeded per row, and free of host syncs."""

from __future__ import annotations

import decodekit
from decodekit_samplers.filters import (
    XTC, EpsilonCutoff, EtaCutoff, LogitBias, MinP, Temperature, TopK, TopNSigma, TopP, Typical,
)
from decodekit_samplers.mirostat import Mirostat
from decodekit_samplers.multinomial import Multinomial
from decodekit_samplers.penalties import DRY, FrequencyPenalty, NoRepeatNGram, PresencePenalty, RepetitionPenalty

COMPONENTS = (
    Temperature, TopK, TopP, MinP, Typical, EpsilonCutoff, EtaCutoff, RepetitionPenalty, PresencePenalty,
    FrequencyPenalty, NoRepeatNGram, LogitBias, TopNSigma, XTC, DRY, Mirostat, Multinomial,
)


@decodekit.hookimpl
def decodekit_register_components(register):
    for cls in COMPONENTS:
        register(cls)


__all__ = [c.__name__ for c in COMPONENTS]
