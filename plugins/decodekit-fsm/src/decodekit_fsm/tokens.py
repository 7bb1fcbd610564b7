"""What each token contributes to the decoded text, as bytes (computed once per tokenizer, cached).

The automaton must see the text the user sees: ``tokenizer.decode(ids, skip_special_tokens=True)``.
That text is the concatenation of per-token *byte* strings decoded as UTF-8 (errors replaced), for
the two families decodekit meets:

* byte-level BPE (GPT-2, SmolLM2, Llama 3): the token string maps back to bytes through GPT-2's
  ``bytes_to_unicode`` table (``Ġ`` is the space byte 0x20); a token may hold half a character.
* SentencePiece with byte fallback (Gemma, Llama 2): ``▁`` is a space and ``<0xE2>`` is one raw byte.

Special tokens decode to nothing (neutral); other added tokens contribute their decoded text.
Bytes, not str, because a character may be split across tokens (partial UTF-8).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import weakref
from typing import Any

from decodekit.errors import DecodekitError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_MEMORY: "weakref.WeakKeyDictionary[Any, list[bytes]]" = weakref.WeakKeyDictionary()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for the 256 bytes (Radford et al. 2019, encoder.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {u: b for b, u in _bytes_to_unicode().items()}


def _decoder_kind(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    desc = str(getattr(backend, "decoder", None))
    if "ByteLevel" in desc:
        return "bytelevel"
    if "ByteFallback" in desc or "▁" in desc:
        return "sentencepiece"
    raise DecodekitError(
        f"BannedWords: cannot tell what tokens of {type(tokenizer).__name__} decode to (decoder {desc}); "
        "supported: byte-level BPE and SentencePiece (byte fallback) fast tokenizers"
    )


def _fingerprint(tokenizer: Any, strings: list[str]) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(strings)).encode())
    h.update("\x00".join(strings).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Per token id, the bytes it adds to ``decode(..., skip_special_tokens=True)``.

    Cached in memory per tokenizer object and on disk under ``decodekit.models.cache_dir()/fsm``.
    """
    if tokenizer in _MEMORY:
        return _MEMORY[tokenizer]
    from decodekit.models import cache_dir

    n = len(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(n)))
    strings = [s if s is not None else "" for s in strings]
    path = cache_dir() / "fsm" / f"tokens-{_fingerprint(tokenizer, strings)}.pkl"
    if path.is_file():
        out = pickle.loads(path.read_bytes())
    else:
        out = _compute(tokenizer, strings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(out))
        tmp.rename(path)  # atomic: a half-written table is never read
    _MEMORY[tokenizer] = out
    return out


def _compute(tokenizer: Any, strings: list[str]) -> list[bytes]:
    kind = _decoder_kind(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    out: list[bytes] = []
    for i, s in enumerate(strings):
        if i in special:
            out.append(b"")
        elif i in added:
            out.append(tokenizer.decode([i], skip_special_tokens=True).encode())
        elif kind == "bytelevel":
            try:
                out.append(bytes(_UNICODE_TO_BYTE[c] for c in s))
            except KeyError:  # not a byte-level string (should not happen): trust decode()
                out.append(tokenizer.decode([i], skip_special_tokens=True).encode())
        else:
            m = _BYTE_TOKEN.match(s)
            out.append(bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode())
    return out
