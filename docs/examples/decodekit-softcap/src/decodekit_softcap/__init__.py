"""An example third-party decodekit plugin.

* ``SoftCap``: a processor component, ``cap * tanh(scores / cap)`` (the logit soft-capping of
  Gemma 2), usable in any strategy by name: ``{"processors": [{"name": "SoftCap", "cap": 5.0}]}``.
* a per-token hook, ``decodekit_accept``, that counts committed tokens in every generation.
"""

import torch
from pydantic import Field

import decodekit

COMMITTED: list[int] = []  # tokens committed per step, across generations (for the demo)


class SoftCap(decodekit.Processor):
    """Squash scores smoothly into (-cap, cap)."""

    cap: float = Field(30.0, gt=0, description="the largest score magnitude after capping")

    def process_logits(self, state: decodekit.DecodeState) -> torch.Tensor:
        return self.cap * torch.tanh(state.scores / self.cap)  # [B, T, V]


@decodekit.hookimpl
def decodekit_register_components(register):
    register(SoftCap)


@decodekit.hookimpl
def decodekit_accept(state: decodekit.DecodeState) -> None:
    # int() syncs with the GPU: fine for a demo, not for a hot path (keep tensors, sync at the end).
    COMMITTED.append(int(state.accepted.sum()))
