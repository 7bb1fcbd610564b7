"""The decode loop: prefill -> [pre-logits -> forward -> process-logits -> select/verify ->
accept/rollback -> cache-update]*.

Prefill is simply the first step: the cache has seen no slot yet, so the forward covers the whole
prompt. Every step verifies ``T = 1 + k`` positions per row (k proposals from a drafter, 0 without).
Per-token hooks are resolved once into tuples of plain functions; the only host sync per step is the
stop check (plus decoding text when streaming or watching stop strings).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from decodekit.compiling import is_compile_error, own_code
from decodekit.errors import DecodekitError
from decodekit.plugins import get_plugin_manager
from decodekit.state import DecodeState, Proposal
from decodekit.strategy import Strategy
from decodekit.verify import verify

Fns = tuple[tuple[str, Callable], ...]


@dataclass
class GenerationResult:
    """What :func:`generate` returns."""

    token_ids: list[list[int]]         # new tokens per row
    texts: list[str]                   # new text per row (stop strings cut off)
    stats: dict[str, Any]
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "stop" | "length"


# ---------------------------------------------------------------------------- setup
def _messages(p: Any) -> list[dict[str, str]]:
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if isinstance(p, (list, tuple)) and all(isinstance(m, dict) for m in p):
        return list(p)
    raise DecodekitError(f"chat prompts are strings or lists of {{'role', 'content'}} dicts, got {p!r}")


def tokenize_prompts(tokenizer: Any, prompts: Any, chat: bool) -> tuple[list[list[int]], bool]:
    """Token ids per prompt; returns ``(ids, single)``."""
    single = isinstance(prompts, str) or (chat and isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict))
    if single:
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise DecodekitError("prompts is empty: pass a string or a non-empty list of strings")
    ids = []
    for i, p in enumerate(prompts):
        if chat:
            msgs = _messages(p)
            if not any(m.get("content") for m in msgs):
                raise DecodekitError(f"prompt {i} is empty: give it some text")
            out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(out, dict) or hasattr(out, "input_ids"):
                out = out["input_ids"]
            ids.append(list(out))
        else:
            if not isinstance(p, str):
                raise DecodekitError(f"prompt {i} is a {type(p).__name__}, not a string (pass chat=True for messages)")
            if p == "":
                raise DecodekitError(f"prompt {i} is empty: give it some text")
            ids.append(list(tokenizer(p)["input_ids"]))
            if not ids[-1]:
                raise DecodekitError(f"prompt {i} tokenized to no tokens")
    return ids, single


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos: list[int] = []
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if v is None:
            continue
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if x is not None and int(x) not in eos:
                eos.append(int(x))
        if eos:
            break
    return eos


def _strategy_eos(strategy: Strategy, model: Any, tokenizer: Any) -> list[int]:
    if not strategy.stop_at_eos:
        return []
    return list(strategy.eos_token_ids) if strategy.eos_token_ids is not None else _eos_ids(model, tokenizer)


def _row_seeds(seed: int | Sequence[int] | None, B: int) -> torch.Tensor:
    if seed is None:
        seed = int(torch.randint(0, 2**31, (1,)).item())
    if isinstance(seed, int):
        # Row r gets its own stream; the same (seed, row) gives the same output in any batch.
        return torch.tensor([(seed * 1_000_003 + r) % (1 << 62) for r in range(B)], dtype=torch.long)
    seeds = list(seed)
    if len(seeds) != B:
        raise DecodekitError(f"seed has {len(seeds)} entries for {B} prompts: give one per prompt or a single int")
    return torch.tensor([int(s) % (1 << 62) for s in seeds], dtype=torch.long)


def context_length(model: Any) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    return getattr(cfg, "max_position_embeddings", None)


def prepare(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    strategy: Strategy | dict | str | None,
    *,
    max_new_tokens: int | None,
    seed: int | Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    chat: bool = False,
) -> tuple[DecodeState, Strategy]:
    """Validate everything and build the initial state, before any compute."""
    if isinstance(strategy, str):
        strategy = Strategy.from_json(strategy)
    elif isinstance(strategy, dict):
        strategy = Strategy.from_dict(strategy)
    strategy = strategy or Strategy()
    if max_new_tokens is None:
        max_new_tokens = strategy.max_new_tokens
        if max_new_tokens is None:
            raise DecodekitError("max_new_tokens is missing: pass max_new_tokens=... or set Strategy.max_new_tokens")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DecodekitError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids, _ = tokenize_prompts(tokenizer, prompts, chat)
    B = len(ids)
    lengths = [len(x) for x in ids]
    ctx = context_length(model)
    if ctx is not None:
        longest = max(lengths)
        if longest > ctx:
            i = lengths.index(longest)
            raise DecodekitError(f"prompt {i} has {longest} tokens, longer than the model's context of {ctx}: shorten it")
        if longest + max_new_tokens > ctx:
            raise DecodekitError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {ctx}: "
                f"use max_new_tokens <= {ctx - longest}"
            )
    pad = tokenizer.pad_token_id
    if pad is None:
        # Left padding is masked out, so any id works; the EOS id is what transformers picks too.
        eos = _eos_ids(model, tokenizer)
        pad = eos[0] if eos else 0
    device = model.get_input_embeddings().weight.device
    P = max(lengths)
    grid = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.bool)
    for r, x in enumerate(ids):
        grid[r, P - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, P - len(x):] = True
    grid, mask = grid.to(device), mask.to(device)
    cfg = model.config
    vocab = getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "vocab_size", None) or len(tokenizer)
    state = DecodeState(
        model=model,
        tokenizer=tokenizer,
        device=device,
        batch_size=B,
        vocab_size=int(vocab),
        prompt_ids=ids,
        prompt_lengths=torch.tensor(lengths, device=device),
        seeds=_row_seeds(seed, B).to(device),
        max_new_tokens=max_new_tokens,
        eos_token_ids=torch.tensor(_strategy_eos(strategy, model, tokenizer), dtype=torch.long, device=device),
        pad_token_id=int(pad),
    )
    state.tokens, state.valid = grid[:, : P - 1], mask[:, : P - 1]
    # Its own contiguous memory (not the grid's stride): compiled functions guard on strides.
    state.last = grid[:, P - 1].clone(memory_format=torch.contiguous_format)
    state.dense = len(set(lengths)) == 1
    state.committed = state.prompt_lengths.clone()
    state.n_new = torch.zeros(B, dtype=torch.long, device=device)
    state.finished = torch.zeros(B, dtype=torch.bool, device=device)
    state.extras["stop"] = list(strategy.stop) + list(stop or [])
    state.extras["strategy"] = strategy
    return state, strategy


# ---------------------------------------------------------------------------- one step
def _commit(
    state: DecodeState,
    inputs: torch.Tensor,
    n: torch.Tensor,
    nxt: torch.Tensor,
    max_new: torch.Tensor | None = None,
    eos_on: torch.Tensor | None = None,
    cap: int | None = None,
) -> None:
    """Append this step's committed tokens: per row the first ``n`` proposals and ``nxt``.

    ``max_new`` [B] and ``eos_on`` [B] give per-row budgets and EOS switches (the server's rows
    differ in ``max_tokens`` and ``stop_at_eos``); ``cap`` is then the largest budget.
    """
    B, T = inputs.shape
    budget = state.max_new_tokens if max_new is None else max_new
    cap = state.max_new_tokens if cap is None else cap
    have = state.out_tokens.shape[1]
    if have < cap + T:
        grow = torch.zeros(B, cap + T - have, dtype=torch.long, device=state.device)
        state.out_tokens = torch.cat([state.out_tokens, grow], 1)
    if T == 1:
        # Plain decoding (no proposals): the same rules as below with T = 1, in a third of the
        # small ops; on a small model the host's own ops are what a step costs beyond the model.
        # [B] the row commits nxt. An unfinished row is always under budget: finishing is set
        # the moment n_new reaches it, and a rollback lowers n_new.
        fin = state.finished
        step_tokens = nxt.unsqueeze(1)
        state.out_tokens.scatter_(1, state.n_new.unsqueeze(1), step_tokens)
        live = state.append_slot(state.last, fin)  # the new slot's validity: live rows commit
        state.last = torch.where(fin, state.last, nxt)
        count = live.long()
        state.committed = state.committed + count
        state.n_new = state.n_new + count
        done = state.n_new >= budget
        if state.eos_token_ids.numel():
            hit = torch.isin(nxt, state.eos_token_ids) & live
            done |= hit if eos_on is None else hit & eos_on
        state.finished = state.finished | done
        state.step_tokens, state.accepted = step_tokens, count
        state.rolled_back = n  # zeros: nothing proposed, nothing rolled back
        return
    if B > 1:
        state.dense = False  # ragged acceptance leaves holes (at batch 1 they trail and are trimmed)
    ar = torch.arange(T, device=state.device)
    step_tokens = torch.cat([inputs[:, 1:], torch.zeros_like(inputs[:, :1])], 1)
    step_tokens.scatter_(1, n[:, None], nxt[:, None])
    count = torch.minimum(n + 1, budget - state.n_new)
    if state.eos_token_ids.numel():
        is_eos = torch.isin(step_tokens, state.eos_token_ids) & (ar[None] < count[:, None])
        if eos_on is not None:
            is_eos &= eos_on[:, None]
        first = torch.where(is_eos.any(1), is_eos.long().argmax(1), T)
        count = torch.minimum(count, first + 1)
        eos_hit = is_eos.any(1)
    else:
        eos_hit = torch.zeros_like(state.finished)
    count = count.masked_fill(state.finished, 0)
    state.out_tokens.scatter_(1, state.n_new[:, None] + ar[None], step_tokens)
    # Slot t of this step holds inputs[:, t]; it is committed-and-not-last iff t < count.
    state.append_slots(inputs, ar[None] < count[:, None])
    new_last = step_tokens.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]
    state.last = torch.where(count > 0, new_last, state.last)
    state.committed = state.committed + count
    state.n_new = state.n_new + count
    state.finished = state.finished | (state.n_new >= budget) | (eos_hit & (count > 0))
    state.step_tokens, state.accepted = step_tokens, count
    state.rolled_back = torch.zeros_like(count)


def _commit_plain(state: DecodeState, target: torch.Tensor, eos: int | torch.Tensor | None, early: bool, final: bool,
                  ones: torch.Tensor) -> None:
    """:func:`_commit` for a step of plain decoding (no proposals) while no row was ever rolled
    back, in about half the small ops: on a small model the host's own ops per token are what a
    step costs beyond the model.

    Every live row then has exactly ``state.step`` new tokens, so this step's token goes to that
    column of ``out_tokens`` (a finished row's column is past its ``n_new``: never read). A row
    finishes by EOS (``eos``: one id, several, or None), by a stop string (the consumer marks it
    after the yield) or by its budget, which every live row reaches at the same, host-known step
    (``final``). ``early=False`` says no row can finish before that (no EOS, no stop strings):
    then every row is live and ``finished`` need not be read at all (``ones``: [B] long ones).
    """
    nxt = target.select(1, 0)                       # [B] target is the sampler's own [B, 1]
    state.out_tokens.select(1, state.step).copy_(nxt)
    if early:
        fin = state.finished
        live = state.append_slot(state.last, fin)   # the new slot's validity: live rows commit
        state.last = torch.where(fin, state.last, nxt)
        count = live.long()
    else:
        live = state.append_slot(state.last, None)
        state.last = nxt
        count = ones
    state.committed = state.committed + count
    state.n_new = state.n_new + count
    if final:
        state.finished = torch.ones_like(state.finished)
    elif eos is not None:
        hit = nxt == eos if isinstance(eos, int) else torch.isin(nxt, eos)
        state.finished = state.finished | (hit & live)
    state.step_tokens, state.accepted = target, count
    state.rolled_back = state.n_proposed  # zeros: nothing proposed, nothing rolled back


def _spec_math(target: torch.Tensor, inputs: torch.Tensor, n_proposed: torch.Tensor, finished: torch.Tensor,
               n_new: torch.Tensor, committed: torch.Tensor, last: torch.Tensor, eos_ids: torch.Tensor,
               budget: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`verify` (deterministic drafts) and :func:`_commit` of a step with proposals as one pure
    function of tensors, the same rules op for op, so a compiled cache can run it compiled: ~50
    small kernels become a few fused ones (on a GPU the speculative step is host-bound).

    Returns ``(n_matched, step_tokens, count, valid, last, committed, n_new, finished, out_idx,
    drafted, matched)``; the caller writes ``out_tokens`` and the slot buffer in place.
    """
    B, T = inputs.shape
    k = T - 1
    ar = torch.arange(T, device=inputs.device)
    drafts = inputs[:, 1:]
    ok = (target[:, :k] == drafts) & (ar[None, :k] < n_proposed[:, None])
    n = ok.long().cumprod(1).sum(1)
    nxt = target.gather(1, n[:, None])[:, 0]
    n = n.masked_fill(finished, 0)
    step_tokens = torch.cat([drafts, torch.zeros_like(inputs[:, :1])], 1).scatter(1, n[:, None], nxt[:, None])
    count = torch.minimum(n + 1, budget - n_new)
    is_eos = torch.isin(step_tokens, eos_ids) & (ar[None] < count[:, None])
    eos_hit = is_eos.any(1)
    first = torch.where(eos_hit, is_eos.long().argmax(1), T)
    count = torch.minimum(count, first + 1).masked_fill(finished, 0)
    new_last = step_tokens.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]
    out_idx = n_new[:, None] + ar[None]
    n_new = n_new + count
    finished = finished | (n_new >= budget) | (eos_hit & (count > 0))
    return (n, step_tokens, count, ar[None] < count[:, None], torch.where(count > 0, new_last, last), committed + count,
            n_new, finished, out_idx, n_proposed.sum(), n.sum())


# Compiled _spec_math, one code object per (batch, width, backend) (dynamo's recompile budget is
# per code object).
_SPEC_FNS: dict[tuple, Callable] = {}


def _spec_fn(B: int, T: int, backend: str) -> Callable:
    key = (B, T, backend)
    fn = _SPEC_FNS.get(key)
    if fn is None:
        own = own_code(_spec_math, f"spec_commit_b{B}_t{T}")
        # No CUDA graphs here: the outputs become the next step's state (a graph would overwrite them)
        # and a few fused kernels launched from Python are already cheap.
        fn = _SPEC_FNS[key] = torch.compile(own, backend=backend, dynamic=False)
    return fn


def _commit_compiled(state: DecodeState, inputs: torch.Tensor, target: torch.Tensor, fn: Callable,
                     budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify + commit through the compiled :func:`_spec_math`; returns (drafted, matched) increments."""
    (n, step_tokens, count, valid, last, committed, n_new, finished, out_idx, drafted, matched) = fn(
        target, inputs, state.n_proposed, state.finished, state.n_new, state.committed,
        state.last, state.eos_token_ids, budget)
    state.out_tokens.scatter_(1, out_idx, step_tokens)
    state.append_slots(inputs, valid)
    state.last, state.committed, state.n_new, state.finished = last, committed, n_new, finished
    state.n_matched, state.step_tokens, state.accepted = n, step_tokens, count
    state.rolled_back = torch.zeros_like(count)
    return drafted, matched


def _apply_rollback(state: DecodeState, m: torch.Tensor) -> None:
    """Un-commit the last ``m[r]`` tokens of each row (requested by a component)."""
    m = torch.minimum(m.clamp_min(0), state.n_new)
    if state.batch_size > 1:
        state.dense = False  # rolled-back slots become holes (at batch 1 they trail and are trimmed)
    # Rank valid slots from the end (1 = the last valid slot). Removing m tokens drops `last` and
    # the m-1 slots before it; the m-th slot from the end becomes the new pending token.
    rank = state.valid.flip(1).long().cumsum(1).flip(1)
    hit = state.valid & (rank == m[:, None])
    new_last = state.tokens.gather(1, hit.long().argmax(1, keepdim=True))[:, 0]
    state.last = torch.where(m > 0, new_last, state.last)
    state.valid = state.valid & ~(rank <= m[:, None])
    state.committed = state.committed - m
    state.n_new = state.n_new - m
    state.finished = (state.finished & (m == 0)) | (state.n_new >= state.max_new_tokens)
    state.accepted = torch.zeros_like(m)
    state.rolled_back = m


def _trim(state: DecodeState) -> bool:
    """Drop trailing slots that are holes in every row (at batch 1 the cache then holds exactly the
    committed tokens minus the last) and return whether every row has finished.

    Both answers come back in one host sync: the only one per step (the stop check).
    """
    S = state.n_slots
    used = state.valid.any(0)
    keep = (used.long() * torch.arange(1, S + 1, device=state.device)).max() if S else state.n_new.new_zeros(())
    keep, done = torch.stack([keep, state.finished.all().long()]).tolist()
    if keep < S:
        state.truncate_slots(keep)
    return bool(done)


class _StopCheck:
    """Have all rows finished? On CUDA the answer is read one step late.

    Reading it at once is a host sync per step: the GPU drains, then waits for the host to
    launch the next step. Instead the flag is copied to pinned memory without blocking and read
    after the *next* step has been queued, so the GPU always has work. The cost is at most one
    extra step at the very end, in which every row is finished and nothing changes (finished
    rows commit nothing).
    """

    def __init__(self, device: torch.device) -> None:
        self.lag = self.lags(device)
        self.cuda = device.type == "cuda"
        self.pending: tuple[Any, torch.Tensor] | None = None
        if self.lag and self.cuda:
            self.bufs = [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
            self.i = 0

    @staticmethod
    def lags(device: torch.device) -> bool:
        """CPU work is synchronous: a late answer would only cost an extra step there."""
        return device.type == "cuda"

    def all_finished(self, finished: torch.Tensor) -> bool:
        if not self.lag:
            return bool(finished.all())
        if self.cuda:
            buf, ev = self.bufs[self.i], self.events[self.i]
            self.i ^= 1
            buf.copy_(finished.all(), non_blocking=True)
            ev.record()
        else:
            buf, ev = finished.all(), None
        prev, self.pending = self.pending, (ev, buf)
        if prev is None:
            return False
        if prev[0] is not None:
            prev[0].synchronize()  # the previous step's flag; this step is already queued behind it
        return bool(prev[1])


def run_processors(fns: Fns, state: DecodeState, where: str = "") -> None:
    """The ordered processors: each sees the previous one's ``state.scores`` (returning new scores
    or ``None`` after changing them in place)."""
    for label, fn in fns:
        try:
            out = fn(state)
        except Exception as e:
            e.add_note(f"decodekit: raised in {label}{where}")
            raise
        if out is not None:
            state.scores = out


def _call(fns: Fns, state: DecodeState) -> None:
    for label, fn in fns:
        try:
            fn(state)
        except Exception as e:
            e.add_note(f"decodekit: raised in {label}")
            raise


def run(state: DecodeState, strategy: Strategy) -> Iterator[DecodeState]:
    """Run the loop, yielding the state after every step (committed tokens are final)."""
    pm = get_plugin_manager()
    cache, processors, sampler, drafter = strategy.resolved()
    components = [cache, *processors, sampler] + ([drafter] if drafter else [])

    def resolve(hook: str, comps: list) -> Fns:
        own = tuple((f"{type(c).__name__}.{hook}", getattr(c, hook)) for c in comps if callable(getattr(c, hook, None)))
        return own + pm.per_token(hook)

    pre = resolve("pre_logits", [drafter] if drafter else [])
    proc = resolve("process_logits", processors)
    acc = resolve("accept", components)
    upd = resolve("cache_update", [cache])
    k_max = drafter.max_proposals() if drafter else 0

    def process(state: DecodeState) -> None:
        run_processors(proc, state)

    state.out_tokens = torch.zeros(state.batch_size, state.max_new_tokens + k_max + 1, dtype=torch.long, device=state.device)
    state.proposals = torch.zeros(state.batch_size, 0, dtype=torch.long, device=state.device)
    # Zeros shared by every step without proposals (n_proposed, n_matched, rolled_back): state
    # fields are read-only to components, and one allocation per step is a cost small models see.
    no_proposals = torch.zeros(state.batch_size, dtype=torch.long, device=state.device)
    drafted = torch.zeros((), dtype=torch.long, device=state.device)
    matched = torch.zeros((), dtype=torch.long, device=state.device)
    ready = []
    try:
        for c in components:
            c.setup(state)
            ready.append(c)
    except BaseException:  # a later component refused: the earlier ones give back what they took
        for c in ready:
            c.teardown(state)
        raise
    pm.call("decodekit_generation_start", state=state)
    # Decoding needs no autograd graph; switched off per step, not around the generator, so the
    # caller's grad mode is untouched between yields.
    grad = torch.is_grad_enabled()
    stop_check = _StopCheck(state.device)
    plain = True  # no step so far had proposals or a rollback
    # What can finish a row before its budget: EOS (one id is compared as a host int) and stop
    # strings. With neither, plain decoding never needs to ask the device whether rows finished.
    eos_ids = state.eos_token_ids.tolist()
    eos = None if not eos_ids else eos_ids[0] if len(eos_ids) == 1 else state.eos_token_ids
    early = eos is not None or bool(state.extras.get("stop"))
    ones = torch.ones(state.batch_size, dtype=torch.long, device=state.device)
    # A cache that runs its step compiled (and keeps holes: no host sync) gets verify + commit of a
    # step with deterministic drafts compiled with its backend as well.
    spec_backend = getattr(cache, "compile_backend", None) if drafter is not None else None
    budget = torch.tensor(state.max_new_tokens, device=state.device)
    try:
        while True:
            if grad:
                torch.set_grad_enabled(False)
            # pre-logits: a drafter may propose up to k tokens per row
            proposal = None
            for label, fn in pre:
                try:
                    proposal = fn(state)
                except Exception as e:
                    e.add_note(f"decodekit: raised in {label}")
                    raise
                if proposal is not None:
                    break
            B = state.batch_size
            if proposal is not None and proposal.tokens.shape[1] > 0:
                state.proposals = proposal.tokens.to(state.device, torch.long)
                k = state.proposals.shape[1]
                lengths = proposal.lengths if proposal.lengths is not None else torch.full((B,), k)
                state.n_proposed = lengths.to(state.device).clamp(0, k).masked_fill(state.finished, 0)
            else:
                proposal = None
                if state.proposals.shape[1]:
                    state.proposals = state.proposals[:, :0]
                state.n_proposed = no_proposals
            state.proposal = proposal
            # forward (one model call over all rows and all proposed positions), process-logits
            # (the ordered processors, per position) and select: one unit the cache may capture
            inputs = torch.cat([state.last[:, None], state.proposals], 1) if proposal is not None else state.last.unsqueeze(1)  # [B, T]
            try:
                target, probs = cache.step(state, inputs, process, sampler)  # [B, T], [B, T, V] | None
            except Exception as e:
                if not any(n.startswith("decodekit: raised in") for n in getattr(e, "__notes__", ())):
                    e.add_note(f"decodekit: raised in {type(cache).__name__}.step (forward or {type(sampler).__name__}.sample)")
                raise
            state.forward_passes += 1
            # verify and commit
            if proposal is None:
                state.n_matched = state.n_proposed  # nothing proposed: zeros
                if plain:
                    _commit_plain(state, target, eos, early, state.step + 1 >= state.max_new_tokens, ones)
                else:
                    _commit(state, inputs, state.n_proposed, target.select(1, 0))
            else:
                d = m = None
                if spec_backend is not None and proposal.probs is None and cache.keeps_holes():
                    try:
                        d, m = _commit_compiled(state, inputs, target, _spec_fn(B, inputs.shape[1], spec_backend), budget)
                    except Exception as e:
                        if not is_compile_error(e):
                            raise
                        # Compiling happens before anything runs: the eager path is exact from here on.
                        warnings.warn(f"decodekit: compiling verify + commit failed ({type(e).__name__}); running it eagerly",
                                      RuntimeWarning, stacklevel=2)
                        spec_backend = None
                if d is None:
                    n, nxt = verify(state, target, probs, proposal)
                    n = n.masked_fill(state.finished, 0)
                    d, m = state.n_proposed.sum(), n.sum()
                    state.n_matched = n
                    _commit(state, inputs, n, nxt)
                drafted += d
                matched += m
            # accept/rollback: every stateful component learns what was committed
            _call(acc, state)
            rolled = state._rollback is not None
            if rolled:
                m, state._rollback = state._rollback, None
                _apply_rollback(state, m)
                _call(acc, state)
                state._rollback = None
            if proposal is None and not rolled:
                # One slot per row, committed by every live row: only when all rows have
                # finished can trailing slots be holes in every row, so trim only then.
                # Every step so far committed one token per live row: after max_new_tokens of
                # them every row is finished, which the host knows without asking the device.
                if plain and (state.step + 1 >= state.max_new_tokens or not early):
                    done = state.step + 1 >= state.max_new_tokens
                else:
                    done = stop_check.all_finished(state.finished)
                if done:
                    _trim(state)
            else:
                plain = False
                if cache.keeps_holes():
                    # Rejected slots stay as (masked) holes: no host sync here, the stop flag is
                    # read one step late on CUDA like plain decoding's.
                    state.dense = False
                    done = stop_check.all_finished(state.finished)
                    if done:
                        _trim(state)
                else:
                    done = _trim(state)
            # cache-update: keep exactly the committed prefix minus the last token
            _call(upd, state)
            state.step += 1
            state.counters["drafted"], state.counters["matched"] = drafted, matched
            if grad:
                torch.set_grad_enabled(True)
            yield state
            # A consumer (stop strings) may finish rows after the yield; re-check only then.
            if done or (state.extras.get("stop") and bool(state.finished.all())):
                break
    finally:
        torch.set_grad_enabled(grad)
        # Now, not when the garbage collector finds the state: a component and the strategy that
        # holds it form a cycle, and pooled buffers returned late are buffers the next generation
        # allocates anew (at new addresses, so its compiled CUDA graphs re-record).
        for c in components:
            c.teardown(state)
        pm.call("decodekit_generation_end", state=state)
