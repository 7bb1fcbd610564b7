"""``BannedWords``: the processor that keeps banned words and patterns out of the decoded text."""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator

from decodekit.components import Processor
from decodekit.errors import DecodekitError
from decodekit.state import DecodeState

from decodekit_fsm.automaton import Engine, PatternDFA, WordsDFA, compile_pattern, is_word
from decodekit_fsm.tokens import token_bytes

# Engines are shared by generations with the same tokenizer and configuration (masks stay cached).
_ENGINES: "weakref.WeakKeyDictionary[Any, dict[tuple, Engine]]" = weakref.WeakKeyDictionary()


def get_engine(tokenizer: Any, vocab_size: int, words: tuple[str, ...], patterns: tuple[str, ...], case_sensitive: bool,
               whole_word: bool, end_ids: tuple[int, ...]) -> Engine:
    per_tok = _ENGINES.setdefault(tokenizer, {})
    key = (vocab_size, words, patterns, case_sensitive, whole_word, end_ids)
    eng = per_tok.get(key)
    if eng is None:
        eng = per_tok[key] = Engine(token_bytes(tokenizer), vocab_size, words, patterns, case_sensitive, whole_word, end_ids)
    return eng


@dataclass
class _Row:
    """Host-side automaton state of one row: a stack with one entry per new token, so rollback is
    popping (O(1) per token) and verify position t reads the state after proposals[:t]."""

    stack: list[int]                                   # state after each new token; stack[0] = start
    toks: list[int] = field(default_factory=list)      # new tokens
    cum: list[int] = field(default_factory=lambda: [0])  # characters after each new token
    chars: list[str] = field(default_factory=list)     # the normalised new text, one char per entry
    bans: dict[int, set[int]] = field(default_factory=dict)  # position -> tokens banned there only
    retries: dict[int, int] = field(default_factory=dict)    # position -> rollbacks to it
    masked: bool = False                               # retries exhausted: exact masks from now on
    done: bool = False


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _push(row: _Row, tok: int, step: Any) -> None:
    row.stack.append(step.sid)
    row.toks.append(tok)
    row.chars.extend(step.text)
    row.cum.append(len(row.chars))


class BannedWords(Processor):
    """Ban words and regular expressions from the decoded new text, whatever the tokenization.

    Place it after every processor that might write finite scores over a -inf (it only adds -inf).
    """

    words: list[str] = Field(default_factory=list, description="literal strings that must never appear")
    patterns: list[str] = Field(default_factory=list, description="regular expressions (interegular syntax) that must never match")
    case_sensitive: bool = Field(True, description="False: ban every casing (Unicode casefold of text and words)")
    whole_word: bool = Field(False, description="ban a word only where it is not preceded/followed by a word character")
    mode: Literal["mask", "rollback", "hybrid"] = Field("mask", description="mask: forbid completing tokens; rollback: undo a match and re-decode; hybrid: mask + rollback on mass loss mid-word")
    max_retries: int = Field(3, ge=0, le=100, description="rollbacks to one position before that row falls back to masking")
    hybrid_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="hybrid: roll back when the mask removes more than this probability mid-word")

    _engine: Engine = PrivateAttr(None)
    _rows: list[_Row] = PrivateAttr(default_factory=list)
    _removed: Any = PrivateAttr(None)

    @field_validator("words")
    @classmethod
    def _check_words(cls, v: list[str]) -> list[str]:
        for i, w in enumerate(v):
            if not isinstance(w, str) or w == "":
                raise ValueError(f"words[{i}] is {w!r}: an empty word would match everywhere; remove it")
        return v

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                compile_pattern(p)
            except DecodekitError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _something(self) -> "BannedWords":
        if not self.words and not self.patterns:
            raise ValueError("BannedWords needs at least one entry in words or patterns")
        return self

    # ------------------------------------------------------------------ lifecycle
    def engine_for(self, tokenizer: Any, vocab_size: int, end_ids: tuple[int, ...] = ()) -> Engine:
        return get_engine(tokenizer, vocab_size, tuple(self.words), tuple(self.patterns), self.case_sensitive,
                          self.whole_word, tuple(sorted(end_ids)))

    def setup(self, state: DecodeState) -> None:
        ends = tuple(state.eos_token_ids.tolist())
        self._engine = self.engine_for(state.tokenizer, state.vocab_size, ends)
        self._rows = [_Row([self._engine.start]) for _ in range(state.batch_size)]
        self._removed = None
        state.extras.setdefault("holdback", []).append(self.holdback)

    # ------------------------------------------------------------------ per step
    # Private attributes of a pydantic model are read through __getattr__ (~µs each), so the
    # per-step methods read each once into a local.
    def process_logits(self, state: DecodeState) -> torch.Tensor | None:
        scores = state.scores  # [B, T, V]
        B, T, V = scores.shape
        eng, rows, mode = self._engine, self._rows, self.mode
        if mode == "hybrid":
            self._removed = None  # set below whenever something is banned this step
        # Rows that get exact masks: all in mask/hybrid mode, in rollback mode those whose retries ran out.
        need = [not row.done and (mode != "rollback" or row.masked) for row in rows]
        bans = [] if mode == "mask" else [(r * T + t) * V + tok for r, row in enumerate(rows) if not row.done
                                          for t in range(T) for tok in row.bans.get(len(row.toks) + t, ())]
        if not bans and not any(need):
            return None
        props = state.proposals.tolist() if T > 1 else None  # the FSM is host-side: one sync
        # Flat indices into scores.view(-1) of every banned (row, position, token): cached
        # per-state id arrays shifted to their row/position, written in one go.
        parts = [np.array(bans, dtype=np.int64)] if bans else []
        last = state.max_new_tokens - 1
        for r, row in enumerate(rows):
            if not need[r]:
                continue
            sid, pos = row.stack[-1], len(row.toks)
            for t in range(T):
                at_end = pos + t == last
                ids = eng.mask_ids(sid, at_end)
                if t == 0 and eng.allows_nothing(sid, at_end):
                    raise DecodekitError(self._nothing_left(r, row))
                if len(ids):
                    parts.append(ids + (r * T + t) * V if r or t else ids)
                if t < T - 1:
                    sid = eng.advance(sid, props[r][t]).sid
        if not parts:
            return None
        flat = np.concatenate(parts) if len(parts) > 1 else parts[0]
        # In place (the hook allows it) unless the scores may be the caller's own tensor: the
        # transformers adapter hands over a view of generate's logits (kept for output_logits).
        own = scores.is_contiguous() and not state.extras.get("hf_adapter")
        out = scores if own else scores.contiguous().clone()
        if mode == "hybrid":
            before = out.logsumexp(-1)  # [B, T]
        if out.device.type == "cpu" and out.dtype in _NUMPY_FLOATS and not out.requires_grad:
            out.numpy().reshape(-1)[flat] = -np.inf  # same memory; ~2x cheaper than index_fill_ on a CPU
        else:
            out.view(-1).index_fill_(0, torch.from_numpy(flat).to(out.device), float("-inf"))
        if mode == "hybrid":
            # Probability mass the ban removed at each position (read on the host in accept).
            self._removed = 1.0 - (out.logsumexp(-1) - before).exp()  # [B, T]
        return None if own else out

    def accept(self, state: DecodeState) -> None:
        rows, eng, mode = self._rows, self._engine, self.mode
        B = len(rows)
        steps_t = state.step_tokens if state.step_tokens is not None else state.accepted[:, None]
        if state.accepted.device.type == "cpu":  # four cheap reads
            rolled, acc, finished = state.rolled_back.tolist(), state.accepted.tolist(), state.finished.tolist()
            steps = steps_t.tolist()
        else:  # one host sync for everything the host automaton needs this step
            packed = torch.cat([state.rolled_back.long(), state.accepted.long(), state.finished.long(),
                                steps_t.long().reshape(-1)]).tolist()
            rolled, acc, finished = packed[:B], packed[B:2 * B], packed[2 * B:3 * B]
            Ts = (len(packed) - 3 * B) // B
            steps = [packed[3 * B + r * Ts:3 * B + (r + 1) * Ts] for r in range(B)]
        for r, m in enumerate(rolled):
            if m:
                self._pop(rows[r], m)
        if not any(acc):
            for r, row in enumerate(rows):
                row.done = bool(finished[r])
            return
        removed = None
        if mode == "hybrid":
            rem = self._removed
            removed = rem.tolist() if rem is not None else None
        counts = [0] * B
        for r, row in enumerate(rows):
            back_to = None
            for j in range(acc[r]):
                pos = len(row.toks)
                tok = steps[r][j]
                prev_word = bool(row.chars) and is_word(row.chars[-1])
                step = eng.advance(row.stack[-1], tok)
                _push(row, tok, step)
                if back_to is not None:
                    continue
                if step.hit is not None:
                    back_to = self._on_match(r, row, step, pos)
                elif (removed is not None and not row.masked and prev_word and step.text[:1] and is_word(step.text[0])
                      and removed[r][j] > self.hybrid_threshold):
                    back_to = self._word_start(row, pos)  # mid-word and most mass was banned: re-plan the word
            if back_to is None and mode != "mask" and not row.masked and acc[r] and len(row.toks) >= state.max_new_tokens:
                # The text ends at the length limit: a whole-word match may complete right here.
                end = eng.advance_end(row.stack[-1])
                if end.hit is not None:
                    back_to = self._token_of_char(row, self._match_start(row, end, len(row.toks)))
            if back_to is not None:
                back_to = self._retry(row, back_to)
                counts[r] = len(row.toks) - back_to
            row.done = bool(finished[r]) and counts[r] == 0
        if any(counts):
            state.request_rollback(torch.tensor(counts))

    # ------------------------------------------------------------------ helpers
    def _pop(self, row: _Row, m: int) -> None:
        m = min(m, len(row.toks))
        n = len(row.toks) - m
        del row.stack[n + 1:], row.toks[n:], row.cum[n + 1:]
        del row.chars[row.cum[-1]:]
        # Bans belong to a prefix: those after the new end no longer apply.
        for p in [p for p in row.bans if p > n]:
            del row.bans[p]
        row.done = False

    def _match_start(self, row: _Row, step: Any, pos: int) -> int:
        """Character index (in the row's new text) where the match that ``step`` completed began."""
        hit = step.hit
        end = row.cum[pos] + hit.end
        comp = self._engine.comps[hit.comp]
        if hit.back is not None:
            return max(0, end - hit.back)
        assert isinstance(comp, PatternDFA)
        return comp.match_start(row.chars, end)

    def _token_of_char(self, row: _Row, c: int) -> int:
        return max(0, bisect.bisect_right(row.cum, c) - 1)

    def _word_start(self, row: _Row, pos: int) -> int:
        c = row.cum[pos]
        while c > 0 and is_word(row.chars[c - 1]):
            c -= 1
        return self._token_of_char(row, c)

    def _on_match(self, r: int, row: _Row, step: Any, pos: int) -> int:
        if self.mode != "rollback" or row.masked:
            # Under masking a match can only be committed if every allowed token was at -inf.
            raise DecodekitError(
                f"BannedWords: row {r} committed a token that completes a banned match although the mask "
                f"forbade it: every allowed token had -inf after the processors (new text so far "
                f"{''.join(row.chars)[-60:]!r}); relax a processor or the ban list"
            )
        return self._token_of_char(row, self._match_start(row, step, pos))

    def _retry(self, row: _Row, i: int) -> int:
        """Ban the token chosen at position ``i`` there only; after ``max_retries`` rollbacks to the
        same position the row falls back to exact masking (still rolled back this once)."""
        tok = row.toks[i]
        row.retries[i] = row.retries.get(i, 0) + 1
        if row.retries[i] > self.max_retries:
            row.masked = True
        row.bans.setdefault(i, set()).add(tok)
        return i

    def _nothing_left(self, r: int, row: _Row) -> str:
        what = [c.name for c in self._engine.comps]
        return (f"BannedWords: no token is allowed for row {r} after the new text {''.join(row.chars)[-60:]!r}: "
                f"every token would complete a match of {', '.join(what)}. The ban list leaves the model no way "
                "to continue: remove or narrow the words/patterns")

    # ------------------------------------------------------------------ streaming
    def holdback(self, state: DecodeState) -> list[int]:
        """Per row, how many of the newest tokens may still be rolled back (their text is undecided)."""
        out = []
        eng = self._engine
        for row in self._rows:
            if self.mode == "mask" or row.masked or not row.toks:
                out.append(0)
                continue
            n = len(row.chars)
            if self.mode == "rollback":
                since = []
                start_states = eng.key(eng.start)[1]
                for i, comp in enumerate(eng.comps):
                    if isinstance(comp, WordsDFA):
                        since.append(0)
                        continue
                    k = len(row.stack) - 1
                    while k > 0 and eng.key(row.stack[k])[1][i] != start_states[i]:
                        k -= 1
                    since.append(n - row.cum[k])
                c = n - eng.live_chars(row.stack[-1], since)
            else:  # hybrid: only the current word can be re-planned
                c = n
                while c > 0 and is_word(row.chars[c - 1]):
                    c -= 1
            out.append(len(row.toks) - self._token_of_char(row, c) if c < n else 0)
        return out
