"""decodekit-fsm: banned words and patterns that no tokenization can sneak past.

An automaton over the decoded text (Aho–Corasick for the words, interegular FSMs for the
patterns), exact token masks derived per automaton state, and rollback.
"""

from __future__ import annotations

import decodekit

from decodekit_fsm.automaton import Engine
from decodekit_fsm.banned import BannedWords
from decodekit_fsm.tokens import token_bytes

__all__ = ["BannedWords", "Engine", "token_bytes"]


@decodekit.hookimpl
def decodekit_register_components(register):
    register(BannedWords)
