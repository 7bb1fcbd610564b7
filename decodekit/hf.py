"""decodekit inside transformers' ``generate``.

Three bridges, for users who already call ``model.generate(...)``:

* :func:`as_logits_processor` runs decodekit processors (samplers' warpers, penalties,
  ``BannedWords``) as a transformers ``LogitsProcessor``. transformers tells a processor nothing but
  ``(input_ids, scores)``: assisted / prompt-lookup decoding calls it on candidate prefixes that are
  later cut back, beam search reorders rows, and nobody sends a rollback notice (transformers issues
  #32165, #32946, #34265). So every call re-derives each row's state from the longest common prefix
  (LCP) with what that row saw last time: roll back what diverged, replay what is new, through the
  very ``accept`` protocol the decodekit loop uses. In plain greedy/sampling the LCP is everything
  seen so far and one token is replayed per call.
* :func:`generate` is a ``custom_generate`` callable: ``model.generate(ids,
  custom_generate=decodekit.hf.generate, strategy=...)`` runs the whole decodekit loop (caches,
  speculation, batches) and returns what ``generate`` returns.
* :func:`strategy_from_generation_config` / :func:`to_generation_config` map a transformers
  ``GenerationConfig`` to a :class:`decodekit.Strategy` and back; a field that cannot be honoured is
  an error naming it, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from decodekit.api import _stream_row0
from decodekit.components import Greedy, HFProcessor, Processor
from decodekit.errors import DecodekitError
from decodekit.loop import _apply_rollback, _row_seeds, _trim, run, run_processors
from decodekit.state import DecodeState
from decodekit.strategy import Strategy

try:  # the adapter must *be* a LogitsProcessor so LogitsProcessorList and generate accept it
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover - transformers is a hard dependency of decodekit
    _LogitsProcessorBase = object

__all__ = [
    "DecodekitLogitsProcessor", "as_logits_processor", "generate", "strategy_from_generation_config",
    "to_generation_config",
]


# ============================================================================ LogitsProcessor adapter
def _processors_of(obj: Any) -> list[Processor]:
    """The decodekit processors an adapter should run, from a component, a list or a strategy."""
    if isinstance(obj, (str, dict)):
        obj = Strategy.from_json(obj) if isinstance(obj, str) else Strategy.from_dict(obj)
    if isinstance(obj, Strategy):
        # A LogitsProcessor only rewrites scores: choosing tokens, caching and drafting belong to
        # generate itself. Refuse what would otherwise be dropped silently.
        if obj.sampler is not None and not isinstance(obj.sampler, Greedy):
            raise DecodekitError(
                f"Strategy.sampler={type(obj.sampler).__name__} cannot run inside a LogitsProcessor (transformers "
                "picks the token itself): drop it and pass do_sample=True to generate, or run the whole strategy "
                "with model.generate(..., custom_generate=decodekit.hf.generate, strategy=...)"
            )
        for name in ("cache", "drafter"):
            if getattr(obj, name) is not None:
                raise DecodekitError(
                    f"Strategy.{name}={type(getattr(obj, name)).__name__} cannot run inside a LogitsProcessor: drop it, "
                    "or use model.generate(..., custom_generate=decodekit.hf.generate, strategy=...)"
                )
        if obj.stop:
            raise DecodekitError("Strategy.stop cannot run inside a LogitsProcessor: pass stop_strings= to generate instead")
        return list(obj.processors)
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    out = []
    for i, p in enumerate(items):
        if isinstance(p, DecodekitLogitsProcessor):
            out.extend(p.processors)
        elif isinstance(p, Processor):
            out.append(p)
        else:
            raise DecodekitError(
                f"as_logits_processor: item {i} is a {type(p).__name__}, not a decodekit Processor or Strategy "
                "(a transformers LogitsProcessor needs no adapter: put it in the LogitsProcessorList directly)"
            )
    return out


class DecodekitLogitsProcessor(_LogitsProcessorBase):
    """A transformers ``LogitsProcessor`` running decodekit processors, stateful ones exactly.

    It keeps a :class:`decodekit.DecodeState` whose committed tokens are, per row, the ``input_ids``
    of the previous call. On each call it finds, per row, the longest common prefix ``l`` with that
    history, rolls back the rest (``accept`` with ``rolled_back = m``, the decodekit rollback
    protocol) and replays the new tokens (``accept`` with ``accepted = n``, ragged across rows, ``n``
    may exceed 1). Then the processors run on ``scores`` as verify position 0.

    A new generation (another batch size, other prompt columns) starts over with ``setup``.
    With ``rollback=False`` a rollback is done by rebuilding: ``setup`` on a fresh state, then
    one ``accept`` replaying every new token (for components whose rollback is not exact).

    Cost: one host sync per call (the LCP length decides the replay's shape), one ``accept`` call
    per component and the processors' own work.
    """

    def __init__(
        self,
        processors: Sequence[Processor],
        *,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
        rollback: bool = True,
        max_new_tokens: int = 256,
    ) -> None:
        self.processors = list(processors)
        self.tokenizer = tokenizer
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = pad_token_id
        self.rollback = rollback
        self.max_new_tokens = max_new_tokens
        self._proc = tuple((f"{type(p).__name__}.process_logits", p.process_logits) for p in self.processors)
        self._acc = tuple((f"{type(p).__name__}.accept", p.accept) for p in self.processors if callable(getattr(p, "accept", None)))
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (the next call starts over)."""
        self.state: DecodeState | None = None
        self._seen: torch.Tensor | None = None  # [B, L] what each row's state holds
        self._prompt: torch.Tensor | None = None  # [B, P] the first call's input_ids
        self.calls = {"calls": 0, "rolled_back": 0, "replayed": 0, "restarts": 0}

    # ------------------------------------------------------------------ state
    def _start(self, input_ids: torch.Tensor, vocab_size: int) -> DecodeState:
        """A fresh state whose committed tokens are ``input_ids`` (left pads are invalid slots)."""
        B, L = input_ids.shape
        device = input_ids.device
        if self.pad_token_id is not None:
            # Leading pads are left padding (as in transformers' batched generate): masked holes.
            lead = (input_ids == self.pad_token_id).long().cumprod(1).bool()
            lead[:, -1] = False  # the last token is always real: it is the next input
            valid = ~lead
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        lengths = valid.sum(1)
        prompt_ids = [row[-n:] for row, n in zip(input_ids.tolist(), lengths.tolist())]
        state = DecodeState(
            model=None,
            tokenizer=self.tokenizer,
            device=device,
            batch_size=B,
            vocab_size=vocab_size,
            prompt_ids=prompt_ids,
            prompt_lengths=lengths,
            seeds=_row_seeds(0, B).to(device),
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=torch.zeros(0, dtype=torch.long, device=device),  # transformers finishes rows
            pad_token_id=int(self.pad_token_id if self.pad_token_id is not None else 0),
        )
        state.tokens, state.valid = input_ids[:, :-1].clone(), valid[:, :-1]
        state.last = input_ids[:, -1].clone()
        state.committed = lengths.clone()
        state.n_new = torch.zeros(B, dtype=torch.long, device=device)
        state.finished = torch.zeros(B, dtype=torch.bool, device=device)
        state.out_tokens = torch.zeros(B, 64, dtype=torch.long, device=device)
        state.proposals = torch.zeros(B, 0, dtype=torch.long, device=device)
        state.n_proposed = torch.zeros(B, dtype=torch.long, device=device)
        state.extras["hf_adapter"] = True
        for p in self.processors:
            p.setup(state)
        self.state, self._seen, self._prompt = state, input_ids.clone(), input_ids.clone()
        return state

    def _accept(self, state: DecodeState) -> None:
        for label, fn in self._acc:
            try:
                fn(state)
            except Exception as e:
                e.add_note(f"decodekit: raised in {label} (inside decodekit.hf.DecodekitLogitsProcessor)")
                raise
        if state._rollback is not None:
            state._rollback = None
            raise DecodekitError(
                "a decodekit processor requested a rollback of committed tokens (state.request_rollback), which "
                "transformers' generate cannot perform: run the strategy with custom_generate=decodekit.hf.generate"
            )

    def _append(self, state: DecodeState, input_ids: torch.Tensor, start: torch.Tensor, count: torch.Tensor, T: int) -> None:
        """Commit ``input_ids[r, start[r] : start[r] + count[r]]`` to row ``r`` (one accept call)."""
        B = input_ids.shape[0]
        ar = torch.arange(T, device=state.device)
        idx = (start[:, None] + ar[None]).clamp_max(input_ids.shape[1] - 1)
        step_tokens = input_ids.gather(1, idx).masked_fill(ar[None] >= count[:, None], 0)  # [B, T]
        # Like the loop's commit: this step's slots hold `last` then the new tokens but the newest.
        inputs = torch.cat([state.last[:, None], step_tokens[:, :-1]], 1)  # [B, T]
        state.tokens = torch.cat([state.tokens, inputs], 1)
        state.valid = torch.cat([state.valid, ar[None] < count[:, None]], 1)
        new_last = step_tokens.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]
        state.last = torch.where(count > 0, new_last, state.last)
        # out_tokens mirrors the new tokens (n_new <= L - P), so this host-known bound never overflows.
        bound = input_ids.shape[1] - self._prompt.shape[1] + T
        if state.out_tokens.shape[1] < bound:
            grow = torch.zeros(B, 2 * bound, dtype=torch.long, device=state.device)
            state.out_tokens = torch.cat([state.out_tokens, grow], 1)
        state.out_tokens.scatter_(1, state.n_new[:, None] + ar[None], step_tokens)
        state.committed = state.committed + count
        state.n_new = state.n_new + count
        state.step_tokens, state.accepted = step_tokens, count
        state.rolled_back = torch.zeros_like(count)
        state.n_matched = (count - 1).clamp_min(0)
        self._accept(state)
        # No trim: T = max(count), so the newest column is valid in some row (no trailing holes).
        state.step += 1

    def _sync(self, input_ids: torch.Tensor, vocab_size: int) -> DecodeState:
        """Bring the state to ``input_ids``: per row, roll back to the LCP, replay the rest."""
        self.calls["calls"] += 1
        state, seen, prompt = self.state, self._seen, self._prompt
        B, L = input_ids.shape
        if state is None or B != seen.shape[0] or L < prompt.shape[1] or input_ids.device != state.device:
            self.calls["restarts"] += state is not None
            return self._start(input_ids, vocab_size)
        P, S = prompt.shape[1], seen.shape[1]
        if L - P > state.max_new_tokens:
            # Components size buffers by max_new_tokens (transformers never says how long a
            # generation runs): double it and rebuild, amortised O(1) per token.
            while L - P > self.max_new_tokens:
                self.max_new_tokens *= 2
            self.calls["restarts"] += 1
            self._start(input_ids[:, :P], vocab_size)
            state = self.state
            lcp = torch.full((B,), P, dtype=torch.long, device=state.device)
            self._append(state, input_ids, lcp, L - lcp, L - P)
            self._seen = input_ids.clone()
            return state
        n = min(S, L)
        same = (input_ids[:, :n] == seen[:, :n]).long().cumprod(1)  # [B, n]
        lcp = same.sum(1)  # [B]
        m = S - lcp  # tokens to un-commit per row
        a = L - lcp  # tokens to replay per row
        new_prompt = (input_ids[:, :P] != prompt).any()
        # The one host sync per call: shapes of the replay depend on it.
        m_max, a_max, restart = torch.stack([m.max(), a.max(), new_prompt.long()]).tolist()
        if restart:
            self.calls["restarts"] += 1
            return self._start(input_ids, vocab_size)
        if m_max > 0:
            self.calls["rolled_back"] += 1
            if self.rollback:
                _apply_rollback(state, m)
                self._accept(state)
                _trim(state)
            else:
                # Rebuild: a fresh state from the prompt, then replay every new token at once.
                state = self._start(input_ids[:, :P], vocab_size)
                lcp = torch.full_like(lcp, P)
                a = L - lcp
                a_max = L - P
        if a_max > 0:
            self.calls["replayed"] += 1
            self._append(state, input_ids, lcp, a, a_max)
        self._seen = input_ids.clone()
        return state

    # ------------------------------------------------------------------ call
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` ``[B, L]``, ``scores`` ``[B, V]`` -> processed scores ``[B, V]``."""
        state = self._sync(input_ids, scores.shape[-1])
        state.scores = scores[:, None].float()  # [B, 1, V]: verify position 0 conditions on input_ids
        run_processors(self._proc, state, " (inside decodekit.hf.DecodekitLogitsProcessor)")
        return state.scores[:, 0].to(scores.dtype)


def as_logits_processor(
    component_or_strategy: Any,
    tokenizer: Any = None,
    *,
    pad_token_id: int | None = None,
    rollback: bool = True,
) -> DecodekitLogitsProcessor:
    """A transformers ``LogitsProcessor`` running decodekit processors inside ``model.generate``.

    Args:
        component_or_strategy: a decodekit ``Processor``, a list of them, or a ``Strategy`` (its
            ``processors``; a sampler other than greedy, a cache, a drafter or stop strings are
            errors: transformers owns those), or a strategy dict / JSON string.
        tokenizer: handed to the components as ``state.tokenizer`` (``BannedWords`` needs it); its
            ``pad_token_id`` marks left padding.
        pad_token_id: overrides the tokenizer's; leading pads of the first call are masked holes.
        rollback: ``True`` un-commits diverged tokens through ``accept`` (exact for components that
            honour the rollback contract); ``False`` rebuilds the state from the prompt instead.

    Use: ``model.generate(ids, logits_processor=LogitsProcessorList([as_logits_processor(...)]))``.
    One adapter follows one generation at a time; reusing it for a new batch starts over.
    """
    return DecodekitLogitsProcessor(
        _processors_of(component_or_strategy), tokenizer=tokenizer, pad_token_id=pad_token_id, rollback=rollback
    )


# ============================================================================ GenerationConfig <-> Strategy
# (GenerationConfig field, decodekit component, its field), in transformers' own order
# (generation/utils.py `_get_logits_processor`): penalties and constraints, then, when sampling,
# the warpers. Keeping that order keeps the outputs equal.
_PENALTIES: tuple[tuple[str, str, str], ...] = (
    ("repetition_penalty", "RepetitionPenalty", "repetition_penalty"),
    ("no_repeat_ngram_size", "NoRepeatNGram", "no_repeat_ngram_size"),
)
_WARPERS: tuple[tuple[str, str, str], ...] = (
    ("temperature", "Temperature", "temperature"),
    ("top_k", "TopK", "top_k"),
    ("top_p", "TopP", "top_p"),
    ("min_p", "MinP", "min_p"),
    ("typical_p", "Typical", "typical_p"),
    ("epsilon_cutoff", "EpsilonCutoff", "epsilon_cutoff"),
    ("eta_cutoff", "EtaCutoff", "eta_cutoff"),
)
#: Values with which transformers adds no processor (its `_get_logits_processor` conditions).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "temperature": (None, 1.0), "top_k": (None, 0), "top_p": (None, 1.0), "min_p": (None,),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "prompt_lookup_num_tokens": (None, 0), "do_sample": (None, False),
}
#: transformers' own defaults of the warper fields: inert without do_sample (transformers fills them
#: into every prepared config, e.g. top_k=50), so they are no reason to refuse a greedy config.
_WARPER_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
                                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
#: Fields that change nothing decodekit does (bookkeeping, beam/assistant-only knobs at their
#: neutral values are checked below, outputs handled by decodekit.hf.generate).
_INERT = {
    "pad_token_id", "bos_token_id", "use_cache", "transformers_version", "return_dict_in_generate",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size", "early_stopping",
    "length_penalty", "encoder_repetition_penalty", "encoder_no_repeat_ngram_size", "is_assistant",
    "compile_config", "disable_compile", "cache_implementation", "cache_config", "max_cache_len", "low_memory",
    "decoder_start_token_id", "max_length",
}
#: Fields accepted at these values only (their transformers defaults).
_FIXED: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "remove_invalid_values": (None, False), "renormalize_logits": (None, False), "guidance_scale": (None, 1.0),
    "output_attentions": (None, False), "output_hidden_states": (None, False), "output_scores": (None, False),
    "output_logits": (None, False), "token_healing": (None, False), "use_mtp": (None, False),
}
_LISTED = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size",
           "bad_words_ids", "max_new_tokens", "eos_token_id", "do_sample", "prompt_lookup_num_tokens")


def _component(name: str, field: str, **config: Any) -> Any:
    """Build a plugin component by name; a missing plugin names the GenerationConfig field."""
    from decodekit.plugins import get_plugin_manager

    try:
        return get_plugin_manager().component(name)(**config)
    except DecodekitError as e:
        raise DecodekitError(f"GenerationConfig.{field} needs the decodekit component {name!r}: {e}") from None
    except ValueError as e:  # pydantic: the component's own range check names its field
        raise DecodekitError(f"GenerationConfig.{field}={config}: {e}") from None


def _bad_words(ids: Any, eos: list[int] | None) -> Processor:
    """transformers' bad_words_ids: exact token-id sequences (the last token of each is masked once
    the rest matches). decodekit-fsm's BannedWords bans *text* in any tokenization, a stricter
    rule; mapping one onto the other would change outputs, so the exact transformers processor is
    wrapped (HFProcessor, per verified position) and the mapping round-trips."""
    from transformers import NoBadWordsLogitsProcessor

    if not isinstance(ids, (list, tuple)) or not all(isinstance(s, (list, tuple)) and s for s in ids):
        raise DecodekitError(f"GenerationConfig.bad_words_ids must be a list of non-empty token-id lists, got {ids!r}")
    return HFProcessor(processor=NoBadWordsLogitsProcessor([list(s) for s in ids], eos_token_id=eos))


def _eos_list(v: Any) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def strategy_from_generation_config(
    cfg: Any, *, extra_processors: Iterable[Any] = (), decoding_only: bool = False
) -> Strategy:
    """Map a transformers ``GenerationConfig`` to a :class:`decodekit.Strategy`.

    Honoured: temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff (when
    ``do_sample``), repetition_penalty, no_repeat_ngram_size, bad_words_ids, max_new_tokens,
    eos_token_id, do_sample (``Multinomial`` sampler, else greedy), prompt_lookup_num_tokens (+
    max_matching_ngram_size: ``PromptLookup`` drafter). Any other field set to a value that would
    change decoding (beam search, min_length, ...) raises a :class:`DecodekitError` naming it.

    Args:
        extra_processors: put between the penalties and the warpers, where transformers merges a
            user's ``logits_processor`` list.
        decoding_only: leave ``max_new_tokens``/``eos_token_id`` out (``decodekit.hf.generate`` reads
            the prepared lengths itself).
    """
    from transformers import GenerationConfig

    if isinstance(cfg, dict):
        cfg = GenerationConfig(**cfg)
    if not isinstance(cfg, GenerationConfig):
        raise DecodekitError(f"expected a transformers GenerationConfig, got {type(cfg).__name__}")
    values = {k: v for k, v in cfg.__dict__.items() if not k.startswith("_")}
    sample = bool(values.get("do_sample"))
    for field, value in values.items():
        if value is None or field in _INERT or field in _NEUTRAL or field in ("max_new_tokens", "eos_token_id"):
            continue
        if field in _FIXED and value in _FIXED[field]:
            continue
        allowed = f"allowed: {[v for v in _FIXED[field] if v is not None]}" if field in _FIXED else "decodekit has no equivalent"
        raise DecodekitError(
            f"GenerationConfig.{field}={value!r} cannot be honoured by a decodekit strategy ({allowed}); "
            f"unset it (decodekit never ignores a generation setting silently)"
        )
    processors: list[Any] = []
    for field, name, attr in _PENALTIES:
        v = values.get(field)
        if v not in _NEUTRAL[field]:
            processors.append(_component(name, field, **{attr: v}))
    eos = _eos_list(values.get("eos_token_id"))
    if values.get("bad_words_ids") is not None:
        processors.append(_bad_words(values["bad_words_ids"], eos))
    processors.extend(extra_processors)
    for field, name, attr in _WARPERS:
        v = values.get(field)
        if v in _NEUTRAL[field]:
            continue
        if not sample:
            if v == _WARPER_DEFAULTS.get(field, object()):
                continue  # transformers' inert default
            raise DecodekitError(
                f"GenerationConfig.{field}={v!r} only acts when sampling, and do_sample is {values.get('do_sample')!r}: "
                "set do_sample=True or unset it"
            )
        if field in ("epsilon_cutoff", "eta_cutoff") and not 0.0 < v < 1.0:
            raise DecodekitError(f"GenerationConfig.{field} must be in (0, 1), got {v!r}")
        processors.append(_component(name, field, **{attr: v}))
    sampler = _component("Multinomial", "do_sample") if sample else Greedy()
    drafter = None
    k = values.get("prompt_lookup_num_tokens")
    if k not in _NEUTRAL["prompt_lookup_num_tokens"]:
        ngram = values.get("max_matching_ngram_size") or 2  # transformers' default when unset
        drafter = _component("PromptLookup", "prompt_lookup_num_tokens", k=int(k), ngram=int(ngram), min_ngram=1)
    extra: dict[str, Any] = {}
    if not decoding_only:
        if values.get("max_new_tokens") is not None:
            extra["max_new_tokens"] = int(values["max_new_tokens"])
        if eos is not None:
            extra["eos_token_ids"] = eos
    return Strategy(processors=processors, sampler=sampler, drafter=drafter, **extra)


def to_generation_config(strategy: Strategy) -> Any:
    """The ``GenerationConfig`` equivalent of ``strategy`` (the inverse of
    :func:`strategy_from_generation_config`); a component transformers has no field for is an
    error naming it."""
    from transformers import GenerationConfig, NoBadWordsLogitsProcessor

    by_name = {name: (field, attr) for field, name, attr in _PENALTIES + _WARPERS}
    out: dict[str, Any] = {}
    for i, p in enumerate(strategy.processors):
        name = type(p).component_name()
        if name in by_name:
            field, attr = by_name[name]
            out[field] = getattr(p, attr)
        elif isinstance(p, HFProcessor) and isinstance(p.processor, NoBadWordsLogitsProcessor):
            out["bad_words_ids"] = [list(s) for s in p.processor.bad_word_ids]
        else:
            raise DecodekitError(f"Strategy.processors[{i}] ({name}) has no GenerationConfig field")
    sampler = strategy.sampler
    if sampler is None or isinstance(sampler, Greedy):
        out["do_sample"] = False
    elif type(sampler).component_name() == "Multinomial":
        out["do_sample"] = True
    else:
        raise DecodekitError(f"Strategy.sampler ({type(sampler).component_name()}) has no GenerationConfig field")
    d = strategy.drafter
    if d is not None:
        if type(d).component_name() != "PromptLookup":
            raise DecodekitError(f"Strategy.drafter ({type(d).component_name()}) has no GenerationConfig field")
        out["prompt_lookup_num_tokens"], out["max_matching_ngram_size"] = d.k, d.ngram
    if strategy.cache is not None:
        raise DecodekitError(f"Strategy.cache ({type(strategy.cache).component_name()}) has no GenerationConfig field")
    if strategy.max_new_tokens is not None:
        out["max_new_tokens"] = strategy.max_new_tokens
    if strategy.eos_token_ids is not None:
        eos = strategy.eos_token_ids
        out["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    return GenerationConfig(**out)


# ============================================================================ custom_generate
def _decoding_fields_set(cfg: Any) -> list[str]:
    """Decoding fields of a prepared GenerationConfig that differ from what adds no processor."""
    out = []
    sample = bool(getattr(cfg, "do_sample", False))
    for field, neutral in _NEUTRAL.items():
        v = getattr(cfg, field, None)
        if v in neutral:
            continue
        if not sample and field in _WARPER_DEFAULTS and v == _WARPER_DEFAULTS[field]:
            continue
        out.append(field)
    return out


_OWN_CRITERIA = ("MaxLengthCriteria", "EosTokenCriteria")
# Processors transformers builds from the fields strategy_from_generation_config maps itself.
_FROM_CONFIG = {
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper",
}


def _user_processors(logits_processor: Any, mapped: bool) -> list[Any]:
    """The processors of ``logits_processor`` that the user added (transformers merged them with
    those it built from the generation config, which the mapped strategy already holds)."""
    out = []
    for p in logits_processor or []:
        if mapped and type(p).__name__ in _FROM_CONFIG:
            continue
        out.extend(p.processors if isinstance(p, DecodekitLogitsProcessor) else [HFProcessor(processor=p)])
    return out


def _left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Unpadded prompt ids per row (one host copy per generation)."""
    if attention_mask is None:
        return input_ids.tolist()
    mask = attention_mask.bool()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise DecodekitError(
            "decodekit.hf.generate needs left padding (a row's attention_mask goes 0 -> 1 only): "
            "tokenize with padding_side='left'"
        )
    return [row[len(row) - n:] if n else [] for row, n in zip(input_ids.tolist(), mask.sum(1).tolist())]


def _initial_state(
    model: Any, tokenizer: Any, prompt_ids: list[list[int]], strategy: Strategy, *,
    max_new_tokens: int, eos: list[int], pad: int, seed: Any,
) -> DecodeState:
    """Like :func:`decodekit.loop.prepare`, from token ids (transformers already tokenized)."""
    B = len(prompt_ids)
    lengths = [len(x) for x in prompt_ids]
    if min(lengths) == 0:
        raise DecodekitError(f"prompt {lengths.index(0)} is empty (all padding): give it at least one token")
    device = model.get_input_embeddings().weight.device
    P = max(lengths)
    grid = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.bool)
    for r, x in enumerate(prompt_ids):  # once per generation
        grid[r, P - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, P - len(x):] = True
    grid, mask = grid.to(device), mask.to(device)
    cfg = model.config
    vocab = getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "vocab_size", None)
    state = DecodeState(
        model=model, tokenizer=tokenizer, device=device, batch_size=B, vocab_size=int(vocab),
        prompt_ids=prompt_ids, prompt_lengths=torch.tensor(lengths, device=device),
        seeds=_row_seeds(seed, B).to(device), max_new_tokens=max_new_tokens,
        eos_token_ids=torch.tensor(eos if strategy.stop_at_eos else [], dtype=torch.long, device=device),
        pad_token_id=int(pad),
    )
    state.tokens, state.valid = grid[:, : P - 1], mask[:, : P - 1]
    state.last = grid[:, P - 1].clone()
    state.committed = state.prompt_lengths.clone()
    state.n_new = torch.zeros(B, dtype=torch.long, device=device)
    state.finished = torch.zeros(B, dtype=torch.bool, device=device)
    state.extras["stop"] = list(strategy.stop)
    state.extras["strategy"] = strategy
    return state


def generate(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    strategy: Strategy | dict | str | None = None,
    seed: int | Sequence[int] | None = None,
    decodekit_tokenizer: Any = None,
    decodekit_streamer: Any = None,
    **model_kwargs: Any,
) -> Any:
    """The decodekit loop behind transformers' API, as a ``custom_generate`` callable::

        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64,
                              custom_generate=decodekit.hf.generate, strategy=strategy, seed=0)

    transformers prepares ``generation_config`` (lengths, EOS, pad) and calls this function with
    ``input_ids`` (left-padded), the ``logits_processor`` and ``stopping_criteria`` lists it built,
    and ``model_kwargs`` (``attention_mask``; its own ``past_key_values`` is not used: the
    strategy's cache is). Extra keyword arguments of ``generate`` named in this signature arrive
    here (transformers' ``_extract_generation_mode_kwargs``).

    Args:
        strategy: the decodekit strategy (``Strategy``, dict or JSON). ``None``: mapped from the
            generation config (:func:`strategy_from_generation_config`). With a strategy, decoding
            fields of the generation config (temperature, ...) are errors: one source of truth.
        seed: an int or one per row (decodekit's counter-based RNG; ``torch.manual_seed`` plays
            no part).
        decodekit_tokenizer: handed to components as ``state.tokenizer`` (``BannedWords`` needs
            it). transformers pops ``tokenizer=`` before a custom_generate callable sees it.
        decodekit_streamer: a streamer (``put``/``end``) for row 0. transformers does not forward
            ``streamer=`` to a custom_generate callable: pass it under this name.

    Returns:
        what ``generate`` returns: the ``[B, L + new]`` sequences tensor (rows that finished early
        padded with ``pad_token_id``), or a ``GenerateDecoderOnlyOutput`` with
        ``return_dict_in_generate=True`` (``sequences`` only: scores, logits, attentions and
        hidden states are errors when requested, not silently ``None``).
    """
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    cfg = generation_config if generation_config is not None else GenerationConfig()
    if getattr(model.config, "is_encoder_decoder", False):
        raise DecodekitError("decodekit.hf.generate runs decoder-only (causal) models; this model is encoder-decoder")
    for field in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(cfg, field, False):
            raise DecodekitError(f"GenerationConfig.{field}=True is not supported by decodekit.hf.generate: unset it")
    for c in stopping_criteria or []:
        if type(c).__name__ not in _OWN_CRITERIA:
            raise DecodekitError(
                f"stopping criterion {type(c).__name__} cannot run in decodekit.hf.generate (only max length and EOS "
                "are honoured): drop it, or use decodekit.generate(stop=[...]) for stop strings"
            )
    if strategy is None:
        strategy = strategy_from_generation_config(cfg, decoding_only=True, extra_processors=_user_processors(logits_processor, True))
    else:
        if isinstance(strategy, str):
            strategy = Strategy.from_json(strategy)
        elif isinstance(strategy, dict):
            strategy = Strategy.from_dict(strategy)
        clash = _decoding_fields_set(cfg)
        if clash:
            raise DecodekitError(
                f"generation settings {clash} clash with strategy=: a strategy decides decoding by itself; unset "
                "them, or drop strategy= to have them mapped (Strategy.from_generation_config)"
            )
        extra = _user_processors(logits_processor, False)
        if extra:
            strategy = strategy.model_copy(update={"processors": [*strategy.processors, *extra]})
    if strategy.stop:
        raise DecodekitError("Strategy.stop (stop strings) is not supported by decodekit.hf.generate: use decodekit.generate")
    prompts = _left_padded(input_ids, model_kwargs.get("attention_mask"))
    L = input_ids.shape[1]
    max_length = getattr(cfg, "max_length", None)
    max_new = strategy.max_new_tokens if max_length is None else max_length - L
    if max_new is None or max_new < 1:
        raise DecodekitError(f"nothing to generate: max_length={max_length} leaves {max_new} new tokens: set max_new_tokens")
    eos = strategy.eos_token_ids if strategy.eos_token_ids is not None else (_eos_list(cfg.eos_token_id) or [])
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    state = _initial_state(model, decodekit_tokenizer, prompts, strategy, max_new_tokens=max_new, eos=eos, pad=pad, seed=seed)
    streamer = decodekit_streamer
    sent = 0
    try:
        if streamer is not None:
            streamer.put(torch.tensor([prompts[0]]))
        for st in run(state, strategy):
            if streamer is not None:
                sent = _stream_row0(streamer, st, sent, final=False)
        if streamer is not None:
            _stream_row0(streamer, state, sent, final=True)
    finally:
        if streamer is not None:
            streamer.end()
    # transformers' layout: the (padded) prompt, then new tokens, finished rows padded with pad.
    width = int(state.n_new.max())
    j = torch.arange(width, device=state.device)
    new = state.out_tokens[:, :width].masked_fill(j[None] >= state.n_new[:, None], pad)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], 1)
    if getattr(cfg, "return_dict_in_generate", False):
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
