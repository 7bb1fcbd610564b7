"""The scheduler: one background thread owns the model and steps one continuous batch.

Requests (:class:`Job`) are queued from the web server's event loop; between two steps the
scheduler admits queued jobs (up to ``max_batch`` rows), drops cancelled ones (their client hung up)
and finished ones, which frees their KV-cache rows (:class:`decodekit.batching.Batch`). Each step's
committed tokens are detokenised per job and handed back to the event loop as events.
``max_batch=1`` serialises requests: the baseline the benchmark compares against. ``cache="static"``
keeps the rows in fixed batch slots of one preallocated KV store (:mod:`decodekit_serve.static`),
whose decode forward runs compiled on CUDA (compiled once, when the thread starts).

Per step the scheduler reads the batch once (:meth:`~decodekit.batching.Batch.poll`: the new
tokens, counts and finished flags in one host sync) and detokenises only each row's new tokens
(:class:`IncrementalText`), so a step's host work does not grow with the length of the outputs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from decodekit.batching import Batch, RowSpec, row_seed
from decodekit.errors import DecodekitError
from decodekit.strategy import Strategy

log = logging.getLogger("decodekit.serve")


def safe_prefix(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent now: hold back a partial UTF-8 character (decoded as
    U+FFFD) and a suffix that could still grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:n]):
                end -= n
                break
    return end


class IncrementalText:
    """The text of a growing token list, decoding only its last few tokens per update.

    The scheme of transformers' ``TextStreamer`` and vLLM's detokenizer: ``tokens[:q]`` are settled
    (their text ``settled`` will not change) and ``p < q`` starts a little context before them;
    the text is ``settled + decode(tokens[p:])[len(decode(tokens[p:q])):]``. Decoding from ``p``
    rather than ``q`` keeps what a decode does at its start (SentencePiece drops a leading space)
    out of the new text; a tail that ends in a partial UTF-8 character (U+FFFD) is not settled, so
    the character is decoded whole once its last byte arrives. A rollback below ``q`` restarts.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.p = self.q = 0
        self.settled = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def update(self, tokens: list[int], lo: int) -> str:
        """``tokens`` is the whole list; tokens before ``lo`` are those of the previous update."""
        if lo < self.q:  # a rollback reached settled tokens
            self.p = self.q = 0
            self.settled = ""
        head = self._decode(tokens[self.p:self.q])
        full = self._decode(tokens[self.p:])
        if not full.startswith(head):  # pragma: no cover - a decoder that rewrites earlier text: decode it all
            self.p = self.q = 0
            self.settled, full, head = "", self._decode(tokens), ""
        tail = full[len(head):]
        self.text = self.settled + tail
        if tail and not tail.endswith("\ufffd"):
            self.p, self.q, self.settled = self.q, len(tokens), self.text
        return self.text


@dataclass
class Job:
    """One request: what to generate, and where its events go (an asyncio queue of the server's
    loop). Events: ``("delta", text)``, ``("done", finish_reason, completion_tokens)``,
    ``("error", exception)``."""

    prompt_ids: list[int]
    strategy: Strategy
    max_new_tokens: int
    seed: int
    stops: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    # --- written by the scheduler thread
    tokens: list[int] = field(default_factory=list)
    sent: int = 0                  # characters of text already sent
    detok: IncrementalText | None = None
    searched: int = 0              # characters of text already searched for stop strings
    done: bool = False
    cancelled: bool = False        # set by the server (client gone); read by the scheduler
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    checked: float = 0.0           # when the server last checked the client was there (its loop's clock)
    key: int = field(default_factory=itertools.count().__next__)

    def emit(self, *event: Any) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for events, event in items:
        events.put_nowait(event)


def _cudagraph_thread_state() -> None:
    """Give this (non-main) thread the thread-local state torch.compile's CUDA graph trees expect.

    torch._inductor.cudagraph_trees keeps its tree managers in a ``threading.local`` set up at
    import, i.e. in the importing thread, and otherwise finds them only in threads autograd
    created; any other thread replaying a ``mode="reduce-overhead"`` graph fails with a bare
    AssertionError (seen on an H200, torch 2.11). This thread gets its own (empty) containers:
    its graphs are recorded and replayed by its own tree manager.
    """
    try:
        import collections
        import threading

        from torch._inductor import cudagraph_trees as ct
    except Exception:  # pragma: no cover - no inductor: nothing is compiled with CUDA graphs
        return
    if not hasattr(ct.local, "tree_manager_containers"):
        ct.local.tree_manager_containers = {}
        ct.local.tree_manager_locks = collections.defaultdict(threading.Lock)


class Scheduler:
    """Owns the model; runs :meth:`_loop` in a daemon thread."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, cache: str = "dynamic",
                 max_len: int = 2048, max_depth: int = 16, compile: bool | None = None,
                 compile_backend: str = "inductor") -> None:
        if max_batch < 1:
            raise DecodekitError(f"max_batch must be >= 1, got {max_batch}")
        if cache not in ("dynamic", "static"):
            raise DecodekitError(f"cache must be 'dynamic' or 'static', got {cache!r}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.cache, self.max_len, self.max_depth = cache, max_len, max_depth
        self.compile, self.compile_backend = compile, compile_backend
        self.batch = self._new_batch()
        self.jobs: dict[int, Job] = {}          # jobs in the batch, by key
        self.pending: queue.Queue[Job] = queue.Queue()
        self.stats = {"steps": 0, "joined": 0, "finished": 0, "cancelled": 0, "failed": 0, "max_rows": 0}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="decodekit-serve-scheduler", daemon=True)

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True

    @property
    def rows(self) -> int:
        return len(self.batch)

    def _new_batch(self) -> Batch:
        if self.cache == "static":
            from decodekit_serve.static import StaticBatch

            return StaticBatch(self.model, self.tokenizer, max_batch=self.max_batch, max_len=self.max_len, max_depth=self.max_depth,
                               compile=self.compile, compile_backend=self.compile_backend)
        return Batch(self.model, self.tokenizer)

    def check_fit(self, n_prompt: int, max_new_tokens: int, strategy: Strategy) -> None:
        """Raise :class:`DecodekitError` if the request can never fit the batch's cache (static
        only: a dynamic cache grows). Called by the server before queueing."""
        check = getattr(self.batch, "check_fit", None)
        if check is not None:
            check(n_prompt, max_new_tokens, strategy)

    @property
    def step_stats(self) -> dict[str, Any]:
        """The static cache's compiled-step figures (``compiled``, ``compiled_steps``, ``eager_steps``,
        ``warmup_s``, ``compile_fallback``); empty for the dynamic cache."""
        return dict(getattr(self.batch.cache, "stats", {})) if self.batch is not None else {}

    # ------------------------------------------------------------------ the thread
    def _warmup(self) -> None:
        """Compile the static cache's decode step before the first request, in this thread and
        autograd mode (the compiled code is guarded on both)."""
        warm = getattr(self.batch, "warmup", None)
        if warm is None:
            return
        try:
            seconds = warm()
        except Exception as e:  # the first request will meet (and report) the same failure
            log.warning("decodekit serve: warming up the static decode step failed: %s: %s", type(e).__name__, e, exc_info=True)
            return
        if seconds:
            log.info("decodekit serve: static decode step compiled in %.1f s", seconds)

    def _loop(self) -> None:
        _cudagraph_thread_state()
        with torch.inference_mode():
            self._warmup()
            while not self._stop.is_set():
                self._admit()
                self._leave([k for k, j in self.jobs.items() if j.cancelled], "cancelled")
                if not len(self.batch):
                    continue
                try:
                    self.batch.step()
                except Exception as e:  # the model or cache failed: every row fails, the server lives
                    self._fail_all(e)
                    continue
                self.stats["steps"] += 1
                self._publish()

    def _admit(self) -> None:
        """Move queued jobs into the batch (block briefly only when the batch is idle)."""
        new: list[Job] = []
        while len(self.batch) + len(new) < self.max_batch:
            try:
                job = self.pending.get(timeout=0.05) if not len(self.batch) and not new else self.pending.get_nowait()
            except queue.Empty:
                break
            if job.cancelled:  # its client left while it waited
                self.stats["cancelled"] += 1
                job.done = True
            else:
                new.append(job)
        if not new:
            return
        specs = [RowSpec(j.key, j.prompt_ids, j.strategy, j.max_new_tokens, row_seed(j.seed)) for j in new]
        try:
            self.batch.join(specs)
            joined = new
        except Exception:
            # One bad strategy (its setup raised) must not sink the others: retry one by one.
            joined = []
            for job, spec in zip(new, specs):
                try:
                    self.batch.join([spec])
                    joined.append(job)
                except Exception as e:
                    self._finish(job, error=e)
        self._flush()  # jobs whose strategy failed to join
        for job in joined:
            self.jobs[job.key] = job
        self.stats["joined"] += len(joined)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self.batch))
        if joined:
            self._publish()

    def _publish(self) -> None:
        """Detokenise what each row committed, send text deltas, and let finished rows leave
        (one host sync: :meth:`~decodekit.batching.Batch.poll`)."""
        b = self.batch
        leave: list[int] = []
        now = time.perf_counter()
        for key, (lo, toks, finished) in b.poll().items():
            job = self.jobs[key]
            if key in b.errors:
                self._finish(job, error=b.errors[key])
                leave.append(key)
                continue
            if lo == len(job.tokens) and not toks and not finished:
                continue  # nothing new (a row that only waited): its text is unchanged
            if lo < len(job.tokens):  # a rollback: text already searched may have changed
                job.searched = 0
            job.tokens = job.tokens[:lo] + toks
            if job.tokens and job.first_token is None:
                job.first_token = now
            if job.detok is None:
                job.detok = IncrementalText(self.tokenizer)
            text = job.detok.update(job.tokens, lo)
            hit = self._find_stop(job, text)
            if hit >= 0:
                self._send(job, text[:hit], final=True)
                self._finish(job, reason="stop")
                leave.append(key)
            elif finished:
                self._send(job, text, final=True)
                at_length = len(job.tokens) >= job.max_new_tokens
                self._finish(job, reason="length" if at_length else "stop")
                leave.append(key)
            else:
                self._send(job, text, final=False)
        self._flush()
        self._leave(leave, None)

    @staticmethod
    def _find_stop(job: Job, text: str) -> int:
        """The first stop string in ``text`` (-1: none); text already searched is searched again
        only where a stop string could straddle the old end."""
        if not job.stops:
            return -1
        start = max(0, min(job.searched, len(text)) - max(len(s) for s in job.stops) + 1)
        hit = min((i for i in (text.find(s, start) for s in job.stops) if i >= 0), default=-1)
        job.searched = len(job.detok.settled)  # the unsettled tail may still change: search it again
        return hit

    def _send(self, job: Job, text: str, final: bool) -> None:
        end = len(text) if final else safe_prefix(text, job.stops)
        if end > job.sent:
            self._emit(job, "delta", text[job.sent:end])
            job.sent = end

    def _emit(self, job: Job, *event: Any) -> None:
        if job.loop is not None:
            self._outbox.setdefault(job.loop, []).append((job.events, event))

    def _flush(self) -> None:
        """Hand a step's events to each event loop in one call: one wake-up of the server's loop
        per step rather than one per row and event (each is a write to its self-pipe)."""
        for loop, items in self._outbox.items():
            loop.call_soon_threadsafe(_deliver, items)
        self._outbox = {}

    def _finish(self, job: Job, *, reason: str | None = None, error: BaseException | None = None) -> None:
        if job.done:
            return
        job.done = True
        if error is not None:
            self.stats["failed"] += 1
            self._emit(job, "error", error)
        else:
            self.stats["finished"] += 1
            self._emit(job, "done", reason, len(job.tokens))

    def _leave(self, keys: list[int], why: str | None) -> None:
        if not keys:
            return
        self.batch.remove(keys)
        for k in keys:
            job = self.jobs.pop(k)
            if why == "cancelled":
                self.stats["cancelled"] += 1
                job.done = True

    def _fail_all(self, e: BaseException) -> None:
        for job in list(self.jobs.values()):
            self._finish(job, error=e)
        self._flush()
        self.jobs.clear()
        self.batch = None  # a static batch's store is freed before the new one is allocated
        self.batch = self._new_batch()
