"""The decodekit hook contract.

Two kinds of hooks:

* **Setup hooks** run through pluggy, once per plugin load or generation.
* **Per-token hooks** (``pre_logits``, ``process_logits``, ``accept``, ``cache_update``) are resolved
  *once per generation* into a tuple of plain functions and then called directly by the loop, so a
  step pays no pluggy dispatch (~2-5 µs a call). They always take one argument, ``state`` (a
  :class:`decodekit.DecodeState`): the state grows, the signatures never do.

A strategy's components (cache, processors, sampler, drafter) expose the same per-token methods
without the ``decodekit_`` prefix; a plugin that implements a per-token hook directly (tracing,
metrics) runs for every generation, after the strategy's own components.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from decodekit.state import DecodeState, Proposal

hookspec = pluggy.HookspecMarker("decodekit")
hookimpl = pluggy.HookimplMarker("decodekit")


@hookspec
def decodekit_register_components(register: Callable[..., None]) -> None:
    """Register named components (caches, processors, samplers, drafters) with the host.

    Call ``register(ComponentClass)`` once per class; the name used in JSON strategies is the
    class's ``name`` attribute (its class name by default).

    Runs once per plugin-manager load; every implementation is called.
    """


@hookspec
def decodekit_register_commands(subparsers: Any) -> None:
    """Add subcommands to the ``decodekit`` CLI.

    ``subparsers`` is an ``argparse`` sub-parsers object: call ``subparsers.add_parser(name, ...)``
    and ``parser.set_defaults(func=callable)``; the callable receives the parsed ``args`` and
    returns an exit code.

    Runs once per CLI start; every implementation is called.
    """


@hookspec
def decodekit_generation_start(state: DecodeState) -> None:
    """A generation is about to prefill: ``state`` holds the prompts, nothing is committed yet.

    Runs once per generation, before the first step; every implementation is called.
    """


@hookspec(firstresult=True)
def decodekit_pre_logits(state: DecodeState) -> Proposal | None:
    """Propose tokens to verify in this step (a drafter), before the forward pass.

    Return a :class:`decodekit.Proposal` with ``tokens`` ``[B, k]`` (and ``probs`` ``[B, k, V]``
    when the draft was sampled) or ``None`` to propose nothing.

    Runs once per step; stops at the first non-None result.
    """


@hookspec
def decodekit_process_logits(state: DecodeState) -> torch.Tensor | None:
    """Turn ``state.scores`` (``[B, T, V]`` float32, one row of T per verified position) into the
    scores to sample from.

    Position ``t`` sees the committed prefix extended by ``state.proposals[:, :t]``. Return new
    scores, or ``None`` after changing ``state.scores`` in place.

    Runs once per step; every implementation is called, in the strategy's order, each seeing the
    previous one's output.
    """


@hookspec
def decodekit_accept(state: DecodeState) -> None:
    """Learn what was committed: per row, ``state.accepted`` tokens (``state.step_tokens[:, :n]``)
    were appended and ``state.rolled_back`` tokens were removed (removal comes first).

    Proposals that were not committed are forgotten here. A component may call
    ``state.request_rollback(counts)`` to un-commit tokens; the host then calls every accept
    implementation again with ``accepted == 0`` and the rollback.

    Runs once per step (twice after a rollback request); every implementation is called.
    """


@hookspec
def decodekit_cache_update(state: DecodeState) -> None:
    """Bring the KV cache in line with ``state``: keep exactly ``state.n_slots`` slots (the committed
    tokens minus each row's last, plus masked holes left by ragged acceptance).

    Runs once per step, after accept; every implementation is called.
    """


@hookspec
def decodekit_generation_end(state: DecodeState) -> None:
    """A generation finished (or was interrupted); ``state`` holds what was committed.

    Runs once per generation; every implementation is called.
    """


#: Hooks called per token: resolved to plain functions once per generation.
PER_TOKEN_HOOKS: tuple[str, ...] = ("pre_logits", "process_logits", "accept", "cache_update")

__all__: list[Any] = ["hookspec", "hookimpl", "PER_TOKEN_HOOKS"]
