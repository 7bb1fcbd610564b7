"""The automaton over the decoded text and the token masks derived from it.

One deterministic automaton reads the *normalised* text stream (UTF-8 decoded, casefolded when
``case_sensitive=False``) one character at a time. It is a product of independent components:

* ``WordsDFA``: every literal word in one Aho–Corasick automaton (Aho & Corasick 1975), made total
  (a dense transition table), with an optional word-boundary marker for ``whole_word``;
* ``PatternDFA``: one interegular FSM per regular expression, compiled as ``[\\s\\S]*(?:p)`` so it
  searches (a match may start anywhere).

A component "hits" on a transition that completes a match. A token is banned in automaton state
``q`` iff walking its characters from ``q`` hits in some component; the components are independent,
so the mask of ``q`` is the OR of per-component masks, each cached per component state. A mask is
computed by walking *all tokens at once* through the component's dense table (numpy gathers over the
vocabulary, tokens sorted by length so step ``l`` only touches tokens longer than ``l``): about
``sum(len(token))`` table lookups, a few ms for 262k tokens, then cached.

A row's full state is ``(pending UTF-8 bytes, component states)``, interned to a small integer.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from decodekit.errors import DecodekitError

WORD_CHARS_DOC = "letters, digits (str.isalnum()) and '_'"


def is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def normalise(text: str, case_sensitive: bool) -> str:
    # Unicode full case folding (str.casefold, Unicode 15 CaseFolding.txt): "Straße" -> "strasse".
    return text if case_sensitive else text.casefold()


def decode_utf8(pending: bytes, data: bytes, final: bool = False) -> tuple[str, bytes]:
    """Decode ``pending + data`` like ``bytes.decode('utf-8', 'replace')`` would inside a longer
    text: returns the characters that are complete and the bytes of a character still open."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    text = dec.decode(pending + data, final)
    return text, dec.getstate()[0]


# ---------------------------------------------------------------------------- alphabet
class Alphabet:
    """Character classes shared by all components: each character that occurs in a word or a
    pattern's alphabet is its own class; every other character is OTHER_WORD or OTHER_NONWORD
    (word-ness decides boundaries); END marks the end of the text (EOS)."""

    def __init__(self, explicit: set[str]) -> None:
        self.chars = sorted(explicit)
        self.index = {c: i for i, c in enumerate(self.chars)}
        n = len(self.chars)
        self.OTHER_NONWORD, self.OTHER_WORD, self.END = n, n + 1, n + 2
        self.size = n + 3
        self.isword = np.array([is_word(c) for c in self.chars] + [False, True, False])

    def cls(self, ch: str) -> int:
        i = self.index.get(ch)
        if i is not None:
            return i
        return self.OTHER_WORD if is_word(ch) else self.OTHER_NONWORD

    def classes(self, text: str) -> list[int]:
        return [self.cls(ch) for ch in text]


# ---------------------------------------------------------------------------- components
@dataclass
class DFA:
    """A total DFA over ``Alphabet`` classes; ``hit[s, c]``: reading ``c`` in ``s`` completes a match."""

    table: np.ndarray  # [S, C] int32 next state
    hit: np.ndarray    # [S, C] bool
    start: int
    name: str

    def nbytes(self) -> int:
        return self.table.nbytes + self.hit.nbytes


@dataclass
class WordsDFA(DFA):
    """Aho–Corasick over the words; ``whole_word`` adds a boundary symbol B between a word and a
    non-word character (and at the ends of the text), and a word w is inserted as B w B (B only on
    a side where w has a word character), so "B cat B" occurs in the marked text iff "cat" occurs
    bounded by non-word characters or the ends."""

    ac: np.ndarray = None        # [N, C+1] Aho–Corasick goto/fail table, column C is B
    out: np.ndarray = None       # [N] node ends some word (itself or on its failure chain)
    minlen: np.ndarray = None    # [N] shortest word (in characters) ending at the node
    depth: np.ndarray = None     # [N] characters the node remembers (longest live prefix)
    whole_word: bool = False
    isword: np.ndarray = None    # [C] per class

    def nbytes(self) -> int:
        return super().nbytes() + self.ac.nbytes + self.out.nbytes + self.minlen.nbytes + self.depth.nbytes

    def match_back(self, s: int, c: int, end_cls: int) -> int | None:
        """Characters from a match's start to just after class ``c`` if reading ``c`` in ``s`` hits
        (the shortest such match: the latest start), else ``None``."""
        best = None
        ac, pw = divmod(s, 2) if self.whole_word else (s, 0)
        B = self.ac.shape[1] - 1
        s1 = ac
        if self.whole_word and ((c == end_cls and pw) or (c != end_cls and bool(self.isword[c]) != bool(pw))):
            s1 = int(self.ac[ac, B])
            if self.out[s1]:
                best = int(self.minlen[s1]) + (0 if c == end_cls else 1)
        if c != end_cls:
            s2 = int(self.ac[s1, c])
            if self.out[s2]:
                best = int(self.minlen[s2]) if best is None else min(best, int(self.minlen[s2]))
        return best

    def live_chars(self, s: int) -> int:
        """How many trailing characters a future match may still start in."""
        return int(self.depth[s // 2 if self.whole_word else s])


def _marked(word: str) -> list[str | None]:
    """The word as the marked stream spells it: None is the boundary symbol B."""
    out: list[str | None] = []
    prev = False  # text start counts as a non-word character
    for ch in word:
        w = is_word(ch)
        if w != prev and out:
            out.append(None)
        out.append(ch)
        prev = w
    if is_word(word[0]):
        out.insert(0, None)
    if is_word(word[-1]):
        out.append(None)
    return out


def build_words(words: Sequence[str], alpha: Alphabet, whole_word: bool) -> WordsDFA:
    C = alpha.size
    B = C  # boundary column of the Aho–Corasick table
    goto: list[dict[int, int]] = [{}]
    term_len = [0]
    depth = [0]
    for w in words:
        node = 0
        syms = _marked(w) if whole_word else list(w)
        for ch in syms:
            c = B if ch is None else alpha.cls(ch)
            nxt = goto[node].get(c)
            if nxt is None:
                nxt = len(goto)
                goto[node][c] = nxt
                goto.append({})
                term_len.append(0)
                depth.append(depth[node] + (ch is not None))
            node = nxt
        term_len[node] = len(w) if term_len[node] == 0 else min(term_len[node], len(w))
    N = len(goto)
    ac = np.zeros((N, C + 1), dtype=np.int32)
    fail = np.zeros(N, dtype=np.int32)
    out = np.array([t > 0 for t in term_len])
    big = np.iinfo(np.int32).max
    minlen = np.array([t if t > 0 else big for t in term_len], dtype=np.int64)
    # BFS: a node's row is its failure node's row with its own edges on top (the classic
    # "DFA-ised" Aho–Corasick: goto or else follow the failure chain).
    queue = []
    for c, v in goto[0].items():
        ac[0, c] = v
        queue.append(v)
    i = 0
    while i < len(queue):
        u = queue[i]
        i += 1
        f = fail[u]
        ac[u] = ac[f]
        out[u] |= out[f]
        minlen[u] = min(minlen[u], minlen[f])
        for c, v in goto[u].items():
            fail[v] = ac[f, c]
            ac[u, c] = v
            queue.append(v)
    minlen = np.where(minlen == big, 0, minlen).astype(np.int32)
    depth_arr = np.array(depth, dtype=np.int32)
    isword = alpha.isword
    cls = np.arange(C)
    if not whole_word:
        table = ac[:, :C].copy()
        table[:, alpha.END] = np.arange(N)  # END changes nothing without boundaries
        hit = out[table]
        hit[:, alpha.END] = False
        return WordsDFA(table, hit, 0, "words", ac=ac, out=out, minlen=minlen, depth=depth_arr, whole_word=False, isword=isword)
    # Composite state 2*node + (previous character is a word character).
    table = np.zeros((2 * N, C), dtype=np.int32)
    hit = np.zeros((2 * N, C), dtype=bool)
    nodes = np.arange(N)
    for pw in (0, 1):
        need_b = (isword[None, :] != bool(pw)) & (cls[None, :] != alpha.END)  # [1, C]
        s1 = np.where(need_b, ac[nodes, B][:, None], nodes[:, None])  # [N, C]
        h1 = need_b & out[s1]
        s2 = ac[s1, cls[None, :]]
        h2 = out[s2]
        nxt = 2 * s2 + isword[None, :]
        # END: emit B if the text ends in a word character, then stop.
        e1 = ac[nodes, B] if pw else nodes
        nxt[:, alpha.END] = 2 * e1
        h = h1 | h2
        h[:, alpha.END] = out[e1] if pw else False
        table[pw::2] = nxt
        hit[pw::2] = h
    return WordsDFA(table, hit, 0, "words", ac=ac, out=out, minlen=minlen, depth=depth_arr, whole_word=True, isword=isword)


@dataclass
class PatternDFA(DFA):
    pattern: str = ""
    anchored: Any = None  # interegular FSM of the pattern alone (finds where a match began)

    def match_start(self, chars: Sequence[str], end: int) -> int:
        """The latest start ``s`` with ``chars[s:end]`` a match (there is one: a hit ended at ``end``)."""
        for s in range(end - 1, -1, -1):
            if self.anchored.accepts(chars[s:end]):
                return s
        return 0


def compile_pattern(p: str) -> tuple[Any, Any]:
    """``(anchored FSM, searching FSM)`` for a pattern, or a DecodekitError naming it."""
    import interegular
    from interegular.patterns import InvalidSyntax, Unsupported

    if not isinstance(p, str) or p == "":
        raise DecodekitError(f"BannedWords.patterns: empty pattern {p!r}; give a regular expression that matches some text")
    try:
        anchored = interegular.parse_pattern(p).to_fsm()
    except Unsupported as e:
        raise DecodekitError(
            f"BannedWords.patterns: {p!r} uses a regex feature interegular does not support ({e}); "
            "unsupported: \\b, ^, $, lookarounds, backreferences. Rewrite it without that feature "
            "(for word boundaries use whole_word=True with a literal word)"
        ) from None
    except (InvalidSyntax, Exception) as e:  # interegular raises a few kinds on malformed input
        raise DecodekitError(f"BannedWords.patterns: {p!r} is not a valid regular expression ({type(e).__name__}: {e})") from None
    if anchored.accepts(""):
        raise DecodekitError(
            f"BannedWords.patterns: {p!r} matches the empty string, so every text would contain a match; "
            "make it match at least one character (e.g. use + instead of *)"
        )
    search = interegular.parse_pattern(r"[\s\S]*(?:" + p + ")").to_fsm().reduce()
    return anchored, search


def pattern_chars(fsm: Any) -> set[str]:
    from interegular.fsm import anything_else

    return {k for k in fsm.alphabet._symbol_mapping if k is not anything_else and isinstance(k, str) and len(k) == 1}


def build_pattern(p: str, anchored: Any, search: Any, alpha: Alphabet) -> PatternDFA:
    from interegular.fsm import anything_else

    states = sorted(search.states)
    idx = {s: i for i, s in enumerate(states)}
    dead = len(states)
    S, C = dead + 1, alpha.size
    table = np.full((S, C), dead, dtype=np.int32)
    hit = np.zeros((S, C), dtype=bool)
    reps = alpha.chars + [anything_else, anything_else, None]
    finals = {idx[f] for f in search.finals}
    for s in states:
        row = search.map.get(s, {})
        for c, rep in enumerate(reps):
            if rep is None:  # END: nothing to read
                table[idx[s], c] = idx[s]
                continue
            t = row.get(search.alphabet[rep])
            if t is not None:
                table[idx[s], c] = idx[t]
                hit[idx[s], c] = idx[t] in finals
    table[dead] = dead
    return PatternDFA(table, hit, idx[search.initial], f"pattern {p!r}", pattern=p, anchored=anchored)


# ---------------------------------------------------------------------------- token tables
@dataclass
class TokenTable:
    """The class sequence of every token in one context (pending bytes), stored column-wise:
    tokens sorted by length, ``cols[l]`` holds position ``l`` of the tokens longer than ``l``."""

    order: np.ndarray        # [V] token ids, longest first
    cols: list[np.ndarray]   # cols[l]: [n_l] int32 classes

    @classmethod
    def build(cls, seqs: Sequence[Sequence[int]]) -> "TokenTable":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter((c for s in seqs for c in s), dtype=np.int32, count=int(lengths.sum()))
        return cls.from_flat(flat, lengths)

    @classmethod
    def from_flat(cls, flat: np.ndarray, lengths: np.ndarray) -> "TokenTable":
        order = np.argsort(-lengths, kind="stable")
        lens = lengths[order]
        starts = (np.cumsum(lengths) - lengths)[order]
        cols = []
        for l in range(int(lens[0]) if len(lens) else 0):
            n = int(np.searchsorted(-lens, -l, side="left"))  # tokens with length > l
            cols.append(flat[starts[:n] + l])
        return cls(order, cols)

    def walk(self, dfa: DFA, start: int, end_cls: int) -> tuple[np.ndarray, np.ndarray]:
        """Run every token from ``start``: ``(hit [V], hit_if_text_ends_after [V])`` in id order."""
        V = len(self.order)
        st = np.full(V, start, dtype=np.int32)
        hit = np.zeros(V, dtype=bool)
        for col in self.cols:
            n = len(col)
            prev = st[:n]
            hit[:n] |= dfa.hit[prev, col]
            st[:n] = dfa.table[prev, col]
        end = hit | dfa.hit[st, end_cls]
        out_hit = np.empty(V, dtype=bool)
        out_end = np.empty(V, dtype=bool)
        out_hit[self.order] = hit
        out_end[self.order] = end
        return out_hit, out_end


# ---------------------------------------------------------------------------- the engine
@dataclass
class Hit:
    comp: int      # which component
    end: int       # characters of this token's text up to and including the match's end
    back: int | None  # characters from the match start to ``end`` (None: search the text)


@dataclass
class Step:
    sid: int       # state after the token
    text: str      # normalised characters the token added
    hit: Hit | None  # the first match the token completes


class Engine:
    """Automaton + token masks for one tokenizer and one BannedWords configuration. Shared by
    every generation that uses them (masks stay cached)."""

    def __init__(self, tok_bytes: Sequence[bytes], vocab_size: int, words: Sequence[str], patterns: Sequence[str],
                 case_sensitive: bool, whole_word: bool, end_ids: Sequence[int], max_cached: int = 4096) -> None:
        self.case_sensitive, self.whole_word = case_sensitive, whole_word
        self.V = max(vocab_size, len(tok_bytes))
        self.bytes = list(tok_bytes) + [b""] * (self.V - len(tok_bytes))
        self.real = len(tok_bytes)
        self.end_ids = frozenset(int(e) for e in end_ids)
        norm_words = sorted({normalise(w, case_sensitive) for w in words})
        compiled = [(p, *compile_pattern(p)) for p in patterns]
        explicit = {ch for w in norm_words for ch in w}
        for _, a, s in compiled:
            explicit |= pattern_chars(a) | pattern_chars(s)
        self.alpha = Alphabet(explicit)
        self.comps: list[DFA] = []
        if norm_words:
            self.comps.append(build_words(norm_words, self.alpha, whole_word))
        for p, a, s in compiled:
            self.comps.append(build_pattern(p, a, s, self.alpha))
        self.start_key = (b"", tuple(c.start for c in self.comps))
        self._ids: dict[tuple, int] = {}
        self._keys: list[tuple] = []
        self.start = self.intern(self.start_key)
        self._tables: dict[bytes, TokenTable] = {}
        self._texts, self._pend = self._clean_texts()
        self._comp_masks: dict[tuple[int, bytes, int], tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[tuple[int, bool, Any], torch.Tensor] = {}
        self._empty: dict[tuple[int, bool], bool] = {}
        self._steps: dict[tuple[int, int], Step] = {}
        self.max_cached = max_cached
        self._tables[b""] = self._table_for(b"")
        # Tokens that add no text and do not end it (special tokens): allowed, but no way forward.
        self._silent = np.array([not b and t not in self.end_ids for t, b in enumerate(self.bytes)])

    # -- states
    def intern(self, key: tuple) -> int:
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = len(self._keys)
            self._keys.append(key)
        return sid

    def key(self, sid: int) -> tuple:
        return self._keys[sid]

    # -- token texts
    def _clean_texts(self) -> tuple[list[str], list[bytes]]:
        texts, pend = [], []
        for b in self.bytes:
            if b.isascii():  # fast path: most tokens
                t, p = b.decode("ascii"), b""
            else:
                t, p = decode_utf8(b"", b)
            texts.append(normalise(t, self.case_sensitive))
            pend.append(p)
        return texts, pend

    def token_text(self, pending: bytes, tok: int) -> tuple[str, bytes, bool]:
        """``(normalised text, new pending bytes, ends the text)`` of token ``tok`` after ``pending``."""
        if tok in self.end_ids:
            text, _ = decode_utf8(pending, b"", final=True)
            return normalise(text, self.case_sensitive), b"", True
        if not pending:
            return self._texts[tok], self._pend[tok], False
        text, p = decode_utf8(pending, self.bytes[tok])
        return normalise(text, self.case_sensitive), p, False

    def _table_for(self, pending: bytes) -> TokenTable:
        tab = self._tables.get(pending)
        if tab is None and not pending:
            tab = self._tables[pending] = self._clean_table()
        if tab is None:
            seqs = []
            for t in range(self.V):
                text, _, end = self.token_text(pending, t)
                seqs.append(self.alpha.classes(text) + ([self.alpha.END] if end else []))
            tab = self._tables[pending] = TokenTable.build(seqs)
        return tab

    def _clean_table(self) -> TokenTable:
        # Vectorised: map every distinct code point once, then all token characters by lookup.
        texts = ["" if t in self.end_ids else x for t, x in enumerate(self._texts)]
        lengths = np.fromiter((len(x) for x in texts), dtype=np.int64, count=len(texts))
        cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        uniq, inv = np.unique(cps, return_inverse=True)
        lut = np.array([self.alpha.cls(chr(int(u))) for u in uniq], dtype=np.int32)
        flat = lut[inv].astype(np.int32) if len(uniq) else np.zeros(0, dtype=np.int32)
        if self.end_ids:
            # END tokens read one END symbol: splice it in at their (empty) position.
            ends = sorted(e for e in self.end_ids if e < self.V)
            offs = np.cumsum(lengths) - lengths
            flat = np.insert(flat, offs[ends], self.alpha.END)
            lengths[ends] += 1
        return TokenTable.from_flat(flat, lengths)

    # -- masks
    def _comp_mask(self, i: int, pending: bytes, s: int) -> tuple[np.ndarray, np.ndarray]:
        k = (i, pending, s)
        m = self._comp_masks.get(k)
        if m is None:
            if len(self._comp_masks) >= self.max_cached:
                self._comp_masks.clear()  # bounded memory; recomputing is cheap
            m = self._comp_masks[k] = self._table_for(pending).walk(self.comps[i], s, self.alpha.END)
        return m

    def mask_np(self, sid: int, at_end: bool = False) -> np.ndarray:
        """[V] bool: tokens that complete a match from state ``sid`` (``at_end``: or whose text
        would end in a match, for the last position before the length limit)."""
        pending, states = self._keys[sid]
        m = np.zeros(self.V, dtype=bool)
        for i, s in enumerate(states):
            hit, end = self._comp_mask(i, pending, s)
            m |= end if at_end else hit
        return m

    def mask(self, sid: int, at_end: bool, device: Any) -> torch.Tensor:
        k = (sid, at_end, device)
        t = self._masks.get(k)
        if t is None:
            if len(self._masks) >= self.max_cached:
                self._masks.clear()
            m = self.mask_np(sid, at_end)
            self._empty[(sid, at_end)] = bool((m | self._silent)[: self.real].all())
            t = self._masks[k] = torch.from_numpy(m).to(device)
        return t

    def zero_mask(self, device: Any) -> torch.Tensor:
        k = ("zero", device)
        t = self._masks.get(k)
        if t is None:
            t = self._masks[k] = torch.zeros(self.V, dtype=torch.bool, device=device)
        return t

    def allows_nothing(self, sid: int, at_end: bool) -> bool:
        return self._empty[(sid, at_end)]

    # -- one token on the host
    def advance(self, sid: int, tok: int) -> Step:
        k = (sid, tok)
        step = self._steps.get(k)
        if step is not None:
            return step
        pending, states = self._keys[sid]
        text, p, end = self.token_text(pending, tok)
        classes = self.alpha.classes(text) + ([self.alpha.END] if end else [])
        states, hit = self._run(states, classes, len(text))
        step = Step(self.intern((p, states)), text, hit)
        if len(self._steps) >= 1 << 20:
            self._steps.clear()
        self._steps[k] = step
        return step

    def advance_end(self, sid: int) -> Step:
        """The text ends here (length limit): flush pending bytes and read END."""
        pending, states = self._keys[sid]
        text, _ = decode_utf8(pending, b"", final=True)
        text = normalise(text, self.case_sensitive)
        states, hit = self._run(states, self.alpha.classes(text) + [self.alpha.END], len(text))
        return Step(self.intern((b"", states)), text, hit)

    def _run(self, states: tuple[int, ...], classes: list[int], n_chars: int) -> tuple[tuple[int, ...], Hit | None]:
        first: Hit | None = None
        out = []
        for i, comp in enumerate(self.comps):
            s = states[i]
            for j, c in enumerate(classes):
                if comp.hit[s, c] and (first is None or min(j + 1, n_chars) < first.end):
                    back = comp.match_back(s, c, self.alpha.END) if isinstance(comp, WordsDFA) else None
                    first = Hit(i, min(j + 1, n_chars), back)
                s = int(comp.table[s, c])
            out.append(s)
        return tuple(out), first

    def live_chars(self, sid: int, since_start: Sequence[int]) -> int:
        """Trailing characters in which a future match may still begin; ``since_start[i]`` is, for
        pattern component ``i``, how many characters ago it was last in its start state."""
        _, states = self._keys[sid]
        n = 0
        for i, comp in enumerate(self.comps):
            if isinstance(comp, WordsDFA):
                n = max(n, comp.live_chars(states[i]))
            else:
                n = max(n, since_start[i])
        return n

    def nbytes(self) -> int:
        tables = sum(sum(c.nbytes for c in t.cols) + t.order.nbytes for t in self._tables.values())
        return sum(c.nbytes() for c in self.comps) + tables
