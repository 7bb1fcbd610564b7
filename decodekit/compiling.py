"""One helper for the compiled pieces of decodekit and its plugins.

torch._dynamo keeps compiled variants per *code object* and stops compiling one after
``recompile_limit`` (8) variants, running it eagerly from then on without a word. Functions that are
compiled for many shapes, models or chains therefore get a private copy of their code per variant
family, each with its own budget (and its own name in dynamo's logs).
"""

from __future__ import annotations

import sys
import types
from typing import Callable


def own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a private code object named ``name`` (globals, defaults and closure shared)."""
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    names = {"co_name": name, **({"co_qualname": name} if sys.version_info >= (3, 11) else {})}
    return types.FunctionType(fn.__code__.replace(**names), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def is_compile_error(e: BaseException) -> bool:
    """Did torch.compile fail to compile (as opposed to the compiled code failing at run time)?
    Compiling happens before a compiled function runs, so after such an error the eager path is
    exact; every compiled piece falls back on exactly these."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        from torch._inductor.exc import InductorError
    except ImportError:  # pragma: no cover - older torch
        InductorError = BackendCompilerFailed  # noqa: N806
    return isinstance(e, (BackendCompilerFailed, InductorError))

