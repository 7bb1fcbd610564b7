"""Public entry points: :func:`generate` and :func:`stream`."""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import torch

from decodekit.errors import DecodekitError
from decodekit.loop import GenerationResult, prepare, run
from decodekit.state import DecodeState
from decodekit.strategy import Strategy


class _Texts:
    """Incremental detokenisation per row: stop strings, and what is safe to emit."""

    def __init__(self, tokenizer: Any, stops: list[str], B: int) -> None:
        self.tok, self.stops, self.B = tokenizer, stops, B
        self.emitted = [0] * B
        self.stopped = [False] * B
        self.final_text: list[str | None] = [None] * B

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def check(self, state: DecodeState) -> list[str]:
        """Update stop-string finishing; return the text committed per row so far (stop cut)."""
        rows = state.new_token_ids()
        texts = []
        for r, ids in enumerate(rows):
            if self.final_text[r] is not None:
                texts.append(self.final_text[r])
                continue
            text = self.decode(ids)
            hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if hit >= 0:
                # Keep the tokens up to the one that completed the stop string; cut the text before it.
                j = next(j for j in range(1, len(ids) + 1) if any(s in self.decode(ids[:j]) for s in self.stops))
                state.n_new[r] = j
                state.finished[r] = True
                self.stopped[r] = True
                text = text[:hit]
                self.final_text[r] = text
            elif bool(state.finished[r]):
                self.final_text[r] = text
            texts.append(text)
        return texts

    def safe(self, r: int, text: str, final: bool) -> str:
        """The part of ``text`` that can no longer change: hold back a partial UTF-8 character and
        a suffix that could still grow into a stop string."""
        if final:
            return text
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for s in self.stops:
            for n in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:n]):
                    end = min(end, len(text[:end]) - n)
                    break
        return text[:end]


def _stats(state: DecodeState, seconds: float) -> dict[str, Any]:
    new = int(state.n_new.sum())
    drafted = int(state.counters.get("drafted", 0))
    matched = int(state.counters.get("matched", 0))
    stats = {
        "new_tokens": new,
        "forward_passes": state.forward_passes,
        "steps": state.step,
        "seconds": seconds,
        "tokens_per_s": new / seconds if seconds > 0 else float("inf"),
        "batch_size": state.batch_size,
    }
    if drafted:
        stats.update(
            drafted=drafted,
            accepted=matched,
            acceptance_rate=matched / drafted,
            # committed tokens per row per target forward pass
            mean_accepted_length=new / max(1, state.batch_size * state.step),
        )
    for key, value in state.extras.get("stats", {}).items():
        stats[key] = value
    return stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finish_reason(state: DecodeState, texts: _Texts, r: int) -> str:
    if texts.stopped[r]:
        return "stop"
    if int(state.n_new[r]) >= state.max_new_tokens:
        return "length"
    return "eos"


def _stream_row0(streamer: Any, state: DecodeState, sent: int, final: bool) -> int:
    """Put row 0's newly committed tokens; returns how many were sent. Tokens a component may
    still roll back (``state.extras['holdback']``, as in :func:`stream`) wait, since a streamer
    cannot take text back."""
    n0 = int(state.n_new[0])
    if not final and not bool(state.finished[0]):
        n0 -= max((int(f(state)[0]) for f in state.extras.get("holdback", ())), default=0)
    if n0 > sent:
        streamer.put(state.out_tokens[0, sent:n0].cpu())
        return n0
    return sent


def generate(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[Any],
    strategy: Strategy | dict | str | None = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    chat: bool = False,
    streamer: Any = None,
) -> GenerationResult:
    """Generate from one prompt or a batch.

    Args:
        prompts: a string, a list of strings, or (``chat=True``) messages.
        strategy: a :class:`Strategy`, its dict or JSON; ``None`` = installed defaults (greedy).
        max_new_tokens: new tokens per row, at most (``None``: ``strategy.max_new_tokens``).
        seed: an int (one stream per row derived from it) or one int per row.
        stop: stop strings; a row finishes when its text contains one (not part of ``texts``).
        chat: apply the tokenizer's chat template.
        streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``, any object
            with ``put``/``end``): gets row 0's prompt first (as transformers sends it, so
            ``skip_prompt=True`` works), then row 0's tokens as they are committed; ``end()`` is
            called even when generation fails.
    """
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise DecodekitError(f"streamer must have put(token_ids) and end() methods (like transformers' TextStreamer), got {type(streamer).__name__}")
    state, strategy = prepare(model, tokenizer, prompts, strategy, max_new_tokens=max_new_tokens, seed=seed, stop=stop, chat=chat)
    texts = _Texts(tokenizer, state.extras["stop"], state.batch_size)
    watch = bool(texts.stops)
    sent = 0
    _sync(state.device)
    t0 = time.perf_counter()
    try:
        if streamer is not None:
            # transformers' protocol: the prompt comes first ([1, L]), so TextStreamer(skip_prompt=True) works.
            streamer.put(torch.tensor([state.prompt_ids[0]]))
        for st in run(state, strategy):
            if watch:
                texts.check(st)
            if streamer is not None:
                sent = _stream_row0(streamer, st, sent, final=False)
        if streamer is not None:
            sent = _stream_row0(streamer, state, sent, final=True)
    finally:
        # Always end the stream: a TextIteratorStreamer consumer would otherwise wait forever.
        if streamer is not None:
            streamer.end()
    _sync(state.device)
    seconds = time.perf_counter() - t0
    final = texts.check(state)
    ids = state.new_token_ids()
    return GenerationResult(
        token_ids=ids,
        texts=final,
        stats=_stats(state, seconds),
        finish_reasons=[_finish_reason(state, texts, r) for r in range(state.batch_size)],
    )


def stream(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[Any],
    strategy: Strategy | dict | str | None = None,
    *,
    max_new_tokens: int | None = None,
    seed: int | Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    chat: bool = False,
) -> Iterator[Any]:
    """Like :func:`generate`, yielding text deltas as tokens are committed: ``str`` for a single
    prompt, ``(row, str)`` for a list. Closing the iterator early stops the generation; what was
    committed stays committed."""
    state, strategy = prepare(model, tokenizer, prompts, strategy, max_new_tokens=max_new_tokens, seed=seed, stop=stop, chat=chat)
    single = isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict))
    texts = _Texts(tokenizer, state.extras["stop"], state.batch_size)
    for st in run(state, strategy):
        current = texts.check(st)
        # Components that may still roll tokens back (decodekit-fsm's rollback mode) register
        # ``holdback(state) -> [tokens per row]``: the text of those newest tokens is held back.
        holds = [f(st) for f in st.extras.get("holdback", ())]
        for r, text in enumerate(current):
            final = texts.final_text[r] is not None
            safe = texts.safe(r, text, final)
            h = max((hold[r] for hold in holds), default=0)
            if h and not final:
                kept = st.out_tokens[r, : max(0, int(st.n_new[r]) - h)].tolist()
                safe = safe[: len(texts.safe(r, texts.decode(kept), False))]
            if len(safe) > texts.emitted[r]:
                delta = safe[texts.emitted[r]:]
                texts.emitted[r] = len(safe)
                yield delta if single else (r, delta)
