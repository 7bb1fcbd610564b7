"""The automaton over the decoded text and the token masks derived from it.

One deterministic automaton reads the *normalised* text stream (UTF-8 decoded, casefolded when
``case_sensitive=False``) one character at a time. It is a product of independent components:

* ``WordsDFA``: every literal word in one Aho–Corasick automaton (Aho & Corasick 1975), made total
  (a dense transition table), with an optional word-boundary marker for ``whole_word``;
* ``PatternDFA``: one interegular FSM per regular expression, compiled as ``[\\s\\S]*(?:p)`` so it
  searches (a match may start anywhere).

A component "hits" on a transition that completes a match. A token is banned in automaton state
``q`` iff walking its characters from ``q`` hits in some component; the components are independent,
so the mask of ``q`` is the union of per-component masks, each cached per component state, and
computed two ways:

* plain literal words (no ``whole_word``): the range construction of FACTS.md. Token texts sorted
  once per tokenizer; a token completes a word from Aho–Corasick node ``q`` iff it contains a word
  (one static set) or starts with the rest of a word whose prefix lies on ``q``'s failure chain,
  and each "starts with" set is one contiguous range (two binary searches). Microseconds to a
  millisecond per new state, independent of the vocabulary size;
* everything else (``whole_word``, patterns): walk *all tokens at once* through the component's
  dense table (numpy gathers over the vocabulary, tokens sorted by length so step ``l`` only
  touches tokens longer than ``l``): ``sum(len(token))`` lookups, ~10 ms on 49k tokens.

After bytes of an unfinished character (partial UTF-8) the mask is derived from a clean state's
(see ``Engine._pending_ids``). Masks are sorted arrays of banned ids: they are sparse.

A row's full state is ``(pending UTF-8 bytes, component states)``, interned to a small integer.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

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
    fail: np.ndarray = None      # [N] failure node (longest proper suffix that is a node)
    wlo: np.ndarray = None       # [N] the words below a node are words[wlo:whi] (sorted list)
    whi: np.ndarray = None
    words: list = None           # the sorted, normalised words

    def nbytes(self) -> int:
        arrays = (self.ac, self.out, self.minlen, self.depth, self.fail, self.wlo, self.whi)
        return super().nbytes() + sum(a.nbytes for a in arrays)

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
    """Aho–Corasick over ``words`` (sorted, unique). The trie is built in Python (one dict lookup
    per character); the goto/fail table is filled one BFS level at a time with numpy (all nodes of
    a level at once), so 10,000 words build in ~0.1 s instead of a per-node Python loop."""
    C = alpha.size
    B = C  # boundary column of the Aho–Corasick table
    # Words arrive sorted, so the words below a node are one contiguous range [wlo, whi) of the
    # list: the range construction of the masks reads them from there.
    goto: list[dict[int, int]] = [{}]
    parent, sym, level, depth = [0], [0], [0], [0]
    wlo, whi, term_len = [0], [len(words)], [0]
    cls = alpha.cls
    for i, w in enumerate(words):
        node = 0
        for ch in (_marked(w) if whole_word else w):
            c = B if ch is None else cls(ch)
            nxt = goto[node].get(c)
            if nxt is None:
                nxt = len(goto)
                goto[node][c] = nxt
                goto.append({})
                parent.append(node)
                sym.append(c)
                level.append(level[node] + 1)
                depth.append(depth[node] + (ch is not None))
                wlo.append(i)
                whi.append(i + 1)
                term_len.append(0)
            else:
                whi[nxt] = i + 1
            node = nxt
        term_len[node] = len(w) if term_len[node] == 0 else min(term_len[node], len(w))
    N = len(goto)
    par, sy, lev = (np.array(x, dtype=np.int64) for x in (parent, sym, level))
    ac = np.zeros((N, C + 1), dtype=np.int32)
    fail = np.zeros(N, dtype=np.int32)
    tl = np.array(term_len, dtype=np.int64)
    out = tl > 0
    big = np.iinfo(np.int32).max
    minlen = np.where(out, tl, big)
    # BFS by level: a node's row is its failure node's row with its own edges on top (the classic
    # "DFA-ised" Aho–Corasick); failure nodes are shallower, so their rows are final already.
    by_level = np.argsort(lev, kind="stable")
    bounds = np.searchsorted(lev[by_level], np.arange(int(lev.max()) + 3))
    for d in range(len(bounds) - 2):
        U = by_level[bounds[d]:bounds[d + 1]]        # nodes at level d
        if d >= 1:
            F = fail[U]
            ac[U] = ac[F]
            out[U] |= out[F]
            minlen[U] = np.minimum(minlen[U], minlen[F])
        kids = by_level[bounds[d + 1]:bounds[d + 2]]  # their children (level d + 1)
        if len(kids):
            P, S = par[kids], sy[kids]
            fail[kids] = ac[fail[P], S] if d >= 1 else 0
            ac[P, S] = kids
    minlen = np.where(minlen == big, 0, minlen).astype(np.int32)
    depth_arr = np.array(depth, dtype=np.int32)
    extra = dict(ac=ac, out=out, minlen=minlen, depth=depth_arr, isword=alpha.isword, fail=fail,
                 wlo=np.array(wlo, dtype=np.int64), whi=np.array(whi, dtype=np.int64), words=list(words))
    isword = alpha.isword
    cls_all = np.arange(C)
    if not whole_word:
        table = ac[:, :C].copy()
        table[:, alpha.END] = np.arange(N)  # END changes nothing without boundaries
        hit = out[table]
        hit[:, alpha.END] = False
        return WordsDFA(table, hit, 0, "words", whole_word=False, **extra)
    # Composite state 2*node + (previous character is a word character).
    table = np.zeros((2 * N, C), dtype=np.int32)
    hit = np.zeros((2 * N, C), dtype=bool)
    nodes = np.arange(N)
    for pw in (0, 1):
        need_b = (isword[None, :] != bool(pw)) & (cls_all[None, :] != alpha.END)  # [1, C]
        s1 = np.where(need_b, ac[nodes, B][:, None], nodes[:, None])  # [N, C]
        h1 = need_b & out[s1]
        s2 = ac[s1, cls_all[None, :]]
        h2 = out[s2]
        nxt = 2 * s2 + isword[None, :]
        # END: emit B if the text ends in a word character, then stop.
        e1 = ac[nodes, B] if pw else nodes
        nxt[:, alpha.END] = 2 * e1
        h = h1 | h2
        h[:, alpha.END] = out[e1] if pw else False
        table[pw::2] = nxt
        hit[pw::2] = h
    return WordsDFA(table, hit, 0, "words", whole_word=True, **extra)


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


# ---------------------------------------------------------------------------- per-tokenizer texts
FFFD = "\ufffd"  # what the decoder writes for bytes that do not form a character
_TEXTS: "dict[tuple, tuple[Any, TokenTexts]]" = {}


@dataclass
class TokenTexts:
    """What every token writes on a clean slate (no bytes of an unfinished character open),
    normalised. Computed once per token table, vocabulary size and casing, and shared by every
    engine (the walk tables and the sorted order below are built from it)."""

    texts: list[str]        # [V] the complete characters the token writes
    pend: list[bytes]       # [V] bytes of an unfinished character it leaves open
    tail: np.ndarray        # [V] bool: pend is not empty
    cont: np.ndarray        # [V] bool: the first byte is a UTF-8 continuation byte (0x80-0xBF)
    empty: np.ndarray       # [V] bool: no bytes at all (special tokens, padding ids)
    lengths: np.ndarray     # [V] int64 characters per text
    inv: np.ndarray         # [sum lengths] int32: each character of the texts (id order) as an index into chars
    chars: np.ndarray       # [K] distinct code points, sorted
    chars_word: np.ndarray  # [K] bool is_word
    _sorted: Any = None

    def sorted(self) -> tuple[np.ndarray, list[str]]:
        """``(ids [V] sorted by text, the sorted texts)``: the tokens whose text starts with ``s``
        are one contiguous range of that order (FACTS.md), found by two binary searches."""
        if self._sorted is None:
            order = sorted(range(len(self.texts)), key=self.texts.__getitem__)
            self._sorted = (np.array(order, dtype=np.int64), [self.texts[i] for i in order])
        return self._sorted

    def nbytes(self) -> int:
        arrays = (self.tail, self.cont, self.empty, self.lengths, self.inv, self.chars, self.chars_word)
        return sum(a.nbytes for a in arrays)


def _split_utf8(b: bytes) -> tuple[str, bytes]:
    try:  # fast path: a token that is valid UTF-8 on its own leaves nothing open
        return b.decode("utf-8"), b""
    except UnicodeDecodeError:
        return decode_utf8(b"", b)


def token_texts(tok_bytes: Sequence[bytes], V: int, case_sensitive: bool) -> TokenTexts:
    """Cached in memory per token table object (``token_bytes`` returns one list per tokenizer)
    and, for real vocabularies, on disk with the sorted order (~1 s for 262k tokens otherwise)."""
    key = (id(tok_bytes), len(tok_bytes), V, case_sensitive)
    hit = _TEXTS.get(key)
    if hit is not None and hit[0] is tok_bytes:
        return hit[1]
    path = _disk_path(tok_bytes, V, case_sensitive) if len(tok_bytes) >= _DISK_MIN else None
    if path is not None and path.is_file():
        texts, pend, order = pickle.loads(path.read_bytes())
    else:
        split = [_split_utf8(b) for b in tok_bytes] + [("", b"")] * (V - len(tok_bytes))
        texts = [normalise(t, case_sensitive) for t, _ in split]
        pend = [p for _, p in split]
        order = None
    out = _assemble(tok_bytes, V, texts, pend)
    if order is not None:
        out._sorted = (order, [texts[i] for i in order])
    elif path is not None:
        order = out.sorted()[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps((texts, pend, order)))
        tmp.rename(path)  # atomic: a half-written file is never read
    if len(_TEXTS) >= 4:
        _TEXTS.pop(next(iter(_TEXTS)))  # bounded: a few tokenizers per process
    _TEXTS[key] = (tok_bytes, out)  # the reference keeps id(tok_bytes) from being reused
    return out


_DISK_MIN = 8192  # vocabularies smaller than this are cheap to redo (and tests make many)


def _disk_path(tok_bytes: Sequence[bytes], V: int, case_sensitive: bool) -> Any:
    from decodekit.models import cache_dir

    h = hashlib.sha256(pickle.dumps(list(tok_bytes), protocol=5)).hexdigest()[:16]
    return cache_dir() / "fsm" / f"texts-v1-{h}-{V}-{'cs' if case_sensitive else 'cf'}.pkl"


def _assemble(tok_bytes: Sequence[bytes], V: int, texts: list[str], pend: list[bytes]) -> TokenTexts:
    n_pad = V - len(tok_bytes)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=V)
    first = np.fromiter((b[0] if b else 0 for b in tok_bytes), dtype=np.int64, count=len(tok_bytes))
    first = np.concatenate([first, np.zeros(n_pad, dtype=np.int64)])
    empty = np.concatenate([np.fromiter((not b for b in tok_bytes), dtype=bool, count=len(tok_bytes)), np.ones(n_pad, bool)])
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    # Distinct code points by a presence table over [0, max] (no sort of all characters).
    present = np.zeros(int(cps.max()) + 1 if len(cps) else 1, dtype=bool)
    present[cps] = True
    chars = np.flatnonzero(present)
    where = np.zeros(len(present), dtype=np.int32)
    where[chars] = np.arange(len(chars), dtype=np.int32)
    return TokenTexts(
        texts=texts, pend=pend, tail=np.fromiter(map(bool, pend), dtype=bool, count=V),
        cont=(first >= 0x80) & (first < 0xC0), empty=empty, lengths=lengths, inv=where[cps],
        chars=chars, chars_word=np.array([is_word(chr(c)) for c in chars], dtype=bool),
    )


# ---------------------------------------------------------------------------- token tables
@dataclass
class TokenTable:
    """The class sequence of every token on a clean slate, stored column-wise: tokens sorted by
    length, ``cols[l]`` holds position ``l`` of the tokens longer than ``l``."""

    order: np.ndarray        # [V] token ids, longest first
    cols: list[np.ndarray]   # cols[l]: [n_l] int32 classes
    tail: np.ndarray         # [V] bool in ``order``: the token leaves an unfinished character open

    @classmethod
    def from_flat(cls, flat: np.ndarray, lengths: np.ndarray, tail: np.ndarray) -> "TokenTable":
        order = np.argsort(-lengths, kind="stable")
        lens = lengths[order]
        starts = (np.cumsum(lengths) - lengths)[order]
        cols = []
        for l in range(int(lens[0]) if len(lens) else 0):
            n = int(np.searchsorted(-lens, -l, side="left"))  # tokens with length > l
            cols.append(flat[starts[:n] + l])
        return cls(order, cols, tail[order])

    def walk(self, dfa: DFA, start: int, end_cls: int, fffd_cls: int) -> tuple[np.ndarray, np.ndarray]:
        """Run every token from ``start``: ``(hit [V], hit_if_text_ends_after [V])`` in id order.
        Ending the text flushes an unfinished character as U+FFFD, then reads END."""
        V = len(self.order)
        st = np.full(V, start, dtype=np.int32)
        hit = np.zeros(V, dtype=bool)
        for col in self.cols:
            n = len(col)
            prev = st[:n]
            hit[:n] |= dfa.hit[prev, col]
            st[:n] = dfa.table[prev, col]
        end = hit.copy()
        open_ = np.flatnonzero(self.tail)
        if len(open_):
            end[open_] |= dfa.hit[st[open_], fffd_cls]
            st[open_] = dfa.table[st[open_], fffd_cls]
        end |= dfa.hit[st, end_cls]
        out_hit = np.empty(V, dtype=bool)
        out_end = np.empty(V, dtype=bool)
        out_hit[self.order] = hit
        out_end[self.order] = end
        return out_hit, out_end


def _after_prefix(s: str) -> str | None:
    """The least string greater than every string that starts with ``s`` (None: no such string)."""
    s = s.rstrip("\U0010ffff")
    return s[:-1] + chr(ord(s[-1]) + 1) if s else None


def _aranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], hi[i])`` (no Python loop)."""
    lens = hi - lo
    starts = np.cumsum(lens) - lens
    return np.repeat(lo - starts, lens) + np.arange(int(lens.sum()), dtype=np.int64)


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


_NONE = np.zeros(0, dtype=np.int64)


class Engine:
    """Automaton + token masks for one tokenizer and one BannedWords configuration. Shared by
    every generation that uses them (masks stay cached).

    A mask is kept as the sorted ids of the banned tokens (int64): masks are sparse, and writing
    -inf at a few hundred indices is ~100x cheaper on a CPU than a masked_fill over [B, T, V]."""

    def __init__(self, tok_bytes: Sequence[bytes], vocab_size: int, words: Sequence[str], patterns: Sequence[str],
                 case_sensitive: bool, whole_word: bool, end_ids: Sequence[int], max_cached: int = 4096) -> None:
        self.case_sensitive, self.whole_word = case_sensitive, whole_word
        self.V = max(vocab_size, len(tok_bytes))
        self.real = len(tok_bytes)
        self.bytes = tok_bytes
        self.end_ids = frozenset(int(e) for e in end_ids)
        self.tt = token_texts(tok_bytes, self.V, case_sensitive)
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
        self.is_end = np.zeros(self.V, dtype=bool)
        self.is_end[[e for e in self.end_ids if 0 <= e < self.V]] = True
        # Tokens that add no text and do not end it (special tokens): allowed, but no way forward.
        self._silent = self.tt.empty & ~self.is_end
        self._n_writes = int((~self._silent[: self.real]).sum())
        # Ending the text can only complete a match through a boundary, a pattern, or a word
        # holding U+FFFD (an unfinished character is flushed as U+FFFD); else at_end masks are the
        # plain ones.
        self._end_matters = whole_word or bool(patterns) or FFFD in self.alpha.index
        self._fffd = self.alpha.cls(FFFD)
        self._cont = self.tt.cont & ~self.is_end  # decided exactly after open bytes
        self._cont_ids = np.flatnonzero(self._cont)
        self._exact_ids = np.flatnonzero(self._cont | self._silent)
        self._table: TokenTable | None = None
        self._static: np.ndarray | None = None
        self._node_ranges: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._comp_masks: dict[tuple[int, int, bool], np.ndarray] = {}
        self._masks: dict[tuple[int, bool], np.ndarray] = {}
        self._empty: dict[tuple[int, bool], bool] = {}
        self._steps: dict[tuple[int, int], Step] = {}
        self.max_cached = max_cached
        if norm_words and not whole_word:
            self.tt.sorted()  # the range construction needs it for every state but the start
        self.mask_ids(self.start)  # the first step needs it: part of the build

    def clear_caches(self) -> None:
        """Forget cached masks and steps (benchmarks: time a generation with a built engine but
        cold masks)."""
        for d in (self._node_ranges, self._comp_masks, self._masks, self._empty, self._steps):
            d.clear()

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
    def _bytes(self, tok: int) -> bytes:
        return self.bytes[tok] if tok < self.real else b""

    def token_text(self, pending: bytes, tok: int) -> tuple[str, bytes, bool]:
        """``(normalised text, new pending bytes, ends the text)`` of token ``tok`` after ``pending``."""
        if tok in self.end_ids:
            text, _ = decode_utf8(pending, b"", final=True)
            return normalise(text, self.case_sensitive), b"", True
        if not pending:
            return self.tt.texts[tok], self.tt.pend[tok], False
        text, p = decode_utf8(pending, self._bytes(tok))
        return normalise(text, self.case_sensitive), p, False

    def _clean_table(self) -> TokenTable:
        """Every token's class sequence on a clean slate (END tokens: just END); built on first use."""
        if self._table is None:
            tt, a = self.tt, self.alpha
            lut = np.where(tt.chars_word, a.OTHER_WORD, a.OTHER_NONWORD).astype(np.int32)  # [K]
            for ch, c in a.index.items():
                j = int(np.searchsorted(tt.chars, ord(ch)))
                if j < len(tt.chars) and tt.chars[j] == ord(ch):
                    lut[j] = c
            flat, lengths = lut[tt.inv], tt.lengths.copy()
            ends = np.flatnonzero(self.is_end)
            if len(ends):
                # END tokens write nothing of their own and read one END symbol.
                if lengths[ends].any():
                    flat = flat[~np.repeat(self.is_end, lengths)]
                    lengths[ends] = 0
                offs = np.cumsum(lengths) - lengths
                flat = np.insert(flat, offs[ends], a.END)
                lengths[ends] += 1
            self._table = TokenTable.from_flat(flat, lengths, tt.tail & ~self.is_end)
        return self._table

    # -- masks
    def _walk_ids(self, i: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        hit, end = self._clean_table().walk(self.comps[i], s, self.alpha.END, self._fffd)
        return np.flatnonzero(hit), np.flatnonzero(end)

    def _ranges_of(self, comp: WordsDFA, u: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted-order ranges of the tokens that start with the rest of a word below node ``u``."""
        r = self._node_ranges.get(u)
        if r is None:
            _, texts = self.tt.sorted()
            d, V = int(comp.depth[u]), len(texts)
            lo, hi = [], []
            for w in comp.words[comp.wlo[u]:comp.whi[u]]:
                rest = w[d:]
                if not rest:  # the node is this word: a match already ended, nothing to complete
                    continue
                a = bisect.bisect_left(texts, rest)
                up = _after_prefix(rest)
                b = V if up is None else bisect.bisect_left(texts, up, a)
                if a < b:
                    lo.append(a)
                    hi.append(b)
            r = self._node_ranges[u] = (np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64))
        return r

    def _range_ids(self, i: int, comp: WordsDFA, q: int) -> np.ndarray:
        """Exact mask of plain literal words in Aho–Corasick node ``q`` (FACTS.md): token t
        completes a word iff t contains a word (the static set: the walk from the root), or t starts
        with the rest of a word whose prefix is a node on q's failure chain (the suffixes of the
        text that are word prefixes). Each "starts with" set is one range of the sorted texts."""
        if self._static is None:
            self._static = self._walk_ids(i, comp.start)[0]
        parts = []
        u = q
        while u != 0:
            parts.append(self._ranges_of(comp, u))
            u = int(comp.fail[u])
        if not parts:
            return self._static
        lo = np.concatenate([p[0] for p in parts])
        hi = np.concatenate([p[1] for p in parts])
        ids = self.tt.sorted()[0][_aranges(lo, hi)]
        ids = ids[~self.is_end[ids]]  # END tokens write nothing
        return np.union1d(self._static, ids)

    def _comp_ids(self, i: int, s: int, at_end: bool) -> np.ndarray:
        """Banned ids of component ``i`` in its state ``s`` on a clean slate (cached)."""
        k = (i, s, at_end)
        ids = self._comp_masks.get(k)
        if ids is None:
            if len(self._comp_masks) >= self.max_cached:
                self._comp_masks.clear()  # bounded memory; recomputing is cheap
            comp = self.comps[i]
            if isinstance(comp, WordsDFA) and not comp.whole_word and FFFD not in self.alpha.index:
                ids = self._comp_masks[(i, s, False)] = self._comp_masks[(i, s, True)] = self._range_ids(i, comp, s)
            else:
                self._comp_masks[(i, s, False)], self._comp_masks[(i, s, True)] = self._walk_ids(i, s)
                ids = self._comp_masks[k]
        return ids

    def _pending_ids(self, pending: bytes, states: tuple[int, ...], at_end: bool) -> np.ndarray:
        """Mask after bytes of an unfinished character. A token that starts with anything but a
        continuation byte makes the decoder write one U+FFFD for the open bytes and start afresh
        (maximal-subpart replacement, as ``bytes.decode('utf-8', 'replace')``), so it is banned
        iff it is banned in the clean state after U+FFFD; the few continuation-byte tokens (and
        END, which flushes) are decided exactly."""
        after, hit = self._run(states, [self._fffd], 1)
        if hit is not None:
            base = np.flatnonzero(~self._silent)
        else:
            base = self.mask_ids(self.intern((b"", after)), at_end)
        # Silent tokens (no bytes) add nothing but, at the end, flush the open bytes: decided
        # exactly like continuation bytes (hypothesis found b"\xc3" + b"" at the end vs [^a-z ]).
        base = base[~(self._cont[base] | self._silent[base])]
        exact = [t for t in self._exact_ids.tolist() if self._hits(pending, states, t, at_end)]
        return np.union1d(base, np.array(exact, dtype=np.int64))

    def _hits(self, pending: bytes, states: tuple[int, ...], tok: int, at_end: bool) -> bool:
        text, _ = decode_utf8(pending, self._bytes(tok), final=at_end)
        text = normalise(text, self.case_sensitive)
        classes = self.alpha.classes(text) + ([self.alpha.END] if at_end else [])
        return self._run(states, classes, len(text))[1] is not None

    def mask_ids(self, sid: int, at_end: bool = False) -> np.ndarray:
        """Sorted int64 ids of the tokens that complete a match from state ``sid`` (``at_end``: or
        whose text would end in a match, for the last position before the length limit)."""
        at_end = at_end and self._end_matters
        k = (sid, at_end)
        ids = self._masks.get(k)
        if ids is None:
            pending, states = self._keys[sid]
            if pending:
                ids = self._pending_ids(pending, states, at_end)
            else:
                parts = [self._comp_ids(i, s, at_end) for i, s in enumerate(states)]
                ids = parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
            if len(self._masks) >= self.max_cached:
                self._masks.clear()
                self._empty.clear()
            self._masks[k] = ids
            real = ids[: int(np.searchsorted(ids, self.real))]
            self._empty[k] = int((~self._silent[real]).sum()) == self._n_writes
        return ids

    def mask_np(self, sid: int, at_end: bool = False) -> np.ndarray:
        """[V] bool form of :meth:`mask_ids`."""
        m = np.zeros(self.V, dtype=bool)
        m[self.mask_ids(sid, at_end)] = True
        return m

    def allows_nothing(self, sid: int, at_end: bool) -> bool:
        """Every token that writes or ends text is banned (read after :meth:`mask_ids`)."""
        return self._empty[(sid, at_end and self._end_matters)]

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
        if len(self._steps) >= 1 << 18:
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
        """Bytes held by this engine: components, walk table and cached masks (the shared
        per-tokenizer texts are counted by ``TokenTexts.nbytes``)."""
        n = sum(c.nbytes() for c in self.comps)
        if self._table is not None:
            n += sum(c.nbytes for c in self._table.cols) + self._table.order.nbytes + self._table.tail.nbytes
        n += sum(m.nbytes for m in self._masks.values()) + sum(m.nbytes for m in self._comp_masks.values())
        n += sum(lo.nbytes + hi.nbytes for lo, hi in self._node_ranges.values())
        return n
