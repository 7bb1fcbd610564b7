"""decodekit-speculative: lossless speculative decoding for decodekit.

Drafters (the ``drafter`` of a :class:`decodekit.Strategy`): :class:`DraftModel`,
:class:`PromptLookup`, :class:`SelfSpeculative`; the ``decodekit search-skip`` command finds
SelfSpeculative's skip set. Verification is the core's (``decodekit.verify``).
"""

from __future__ import annotations

import decodekit
from decodekit_speculative.draft_model import DraftModel
from decodekit_speculative.prompt_lookup import PromptLookup
from decodekit_speculative.self_speculative import SelfSpeculative, skipping

__all__ = ["DraftModel", "PromptLookup", "SelfSpeculative", "skipping"]


@decodekit.hookimpl
def decodekit_register_components(register):
    for cls in (DraftModel, PromptLookup, SelfSpeculative):
        register(cls)


@decodekit.hookimpl
def decodekit_register_commands(subparsers):
    from decodekit_speculative.search import add_command

    add_command(subparsers)
