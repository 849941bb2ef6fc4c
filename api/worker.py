"""The model worker: one thread owns the model, fed by a bounded queue.

Why one thread: a forward pass already uses every core (torch intra-op threads), so running two requests'
model work at once only makes both slower and doubles peak memory; and the event loop must stay free to answer
probes, reject overload and time requests out while the model works. Why a bounded queue: an unbounded backlog
turns a burst into minutes of latency for everyone and unbounded memory; refusing early (503 + Retry-After)
lets clients back off or go elsewhere. Requests that gave up (timed out) are dropped from the queue at once, so
dead work neither holds a place nor delays anyone.

Micro-batching: each worker turn takes every request waiting at that moment (up to ``max_batch``) and runs them
back to back; a document several of them share is encoded once (by the first) and reused by the others, cache
or no cache. Each request is answered as soon as its own grounding is done. One combined prefill for the whole
turn was tried first and dropped: on a CPU the prefill is compute-bound, so packing documents together saves
little, while every request of the turn then waits for the slowest document's prefill (in the load test this
turned queued requests into timeouts).

Cancellation: a request's model work stops as soon as it is abandoned (its deadline passed or its client went
away). The worker hands ``job.expired`` to the grounder as its ``cancel`` callback, which is asked between prefill
passes (a long window is prefilled in passes of ``cfic.decoding.encode.PREFILL_CHUNK_TOKENS`` tokens) and between
windows; a True answer raises ``GroundingCancelled`` and the worker moves on to the next request. (Without it a
timed-out request kept the model busy until its whole prefill ended: its 504 went out on time, and the requests
behind it timed out too.) Work stopped this way is lost, cached encodings of earlier requests are not."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from cfic.api.cache import EncodingCache, encoding_cache_key
from cfic.documents import as_document
from cfic.errors import CficError, GroundingCancelled
from cfic.types import Document, GroundingResult

log = logging.getLogger("cfic.api.worker")


class Overloaded(Exception):
    """The queue is full (or the worker is not serving): the client should retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class JobExpired(Exception):
    """The request's deadline passed before the worker reached it."""


@dataclass(frozen=True)
class Retrieved:
    """A document the index supplied for a request that sent none."""

    id: str
    text: str
    metadata: dict[str, Any]
    score: float | None


@dataclass(eq=False)
class GroundJob:
    """One request's model work. ``future`` belongs to the request's event loop and is resolved thread-safely.
    """

    query: str
    documents: list[Document] | None
    top_k: int | None
    max_span_tokens: int | None
    threshold: float | None
    abstain: bool | None
    top_documents: int | None
    deadline: float  # time.monotonic() value
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    request_id: str = ""
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # set by the request when it gave up (timeout, disconnect)
    retrieved: list[Retrieved] | None = None
    use_attention: bool = True
    hops: int = 1

    def expired(self) -> bool:
        return self.abandoned or time.monotonic() >= self.deadline


@dataclass
class JobOutcome:
    result: GroundingResult
    cached_tokens: int
    encode_ms: float
    queue_ms: float
    retrieved: list[Retrieved] | None


@dataclass
class WorkerStats:
    processed: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0  # answered 504 (counted by the request side)
    skipped: int = 0  # abandoned before the worker ran them (their model work was saved)
    cancelled: int = 0  # abandoned while the worker ran them: stopped between prefill passes, readings or windows
    batches: int = 0
    max_batch_seen: int = 0


class QueueFull(Exception):
    pass


class JobQueue:
    """A bounded FIFO of jobs that can drop the ones whose requests already gave up.

    ``queue.Queue`` cannot remove items from the middle; here a timed-out request frees its place immediately,
    so a burst of abandoned work never makes the server refuse live requests.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: deque[GroundJob] = deque()
        self._cond = threading.Condition()

    def put_nowait(self, job: GroundJob) -> None:
        with self._cond:
            if len(self._items) >= self.maxsize:
                raise QueueFull
            self._items.append(job)
            self._cond.notify()

    def get(self, timeout: float) -> GroundJob | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def get_nowait(self) -> GroundJob | None:
        with self._cond:
            return self._items.popleft() if self._items else None

    def drop_expired(self) -> list[GroundJob]:
        with self._cond:
            dead = [j for j in self._items if j.expired()]
            if dead:
                self._items = deque(j for j in self._items if not j.expired())
            return dead

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)


def _is_loader(obj: Any, method: str) -> bool:
    return callable(obj) and not hasattr(obj, method)


class ModelWorker:
    """Owns the grounder (and the index) and runs all model work on one thread.

    ``grounder`` is a ready ``Grounder`` or a zero-argument loader returning one; a loader runs on the worker
    thread at start, so the HTTP server can answer ``/healthz`` (and ``/readyz`` = 503) while the model loads.
    ``index`` likewise: a ``CorpusIndex``-like object with ``search``, a loader, or None.
    """

    def __init__(
        self,
        grounder: Any,
        *,
        index: Any = None,
        cache: EncodingCache,
        max_queue: int,
        max_batch: int,
        name: str = "cfic-model-worker",
    ):
        self._grounder_source = grounder
        self._index_source = index
        self.grounder: Any = None if _is_loader(grounder, "ground") else grounder
        self.index: Any = None if _is_loader(index, "search") else index
        self.cache = cache
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.stats = WorkerStats()
        self.state = "ready" if self.grounder is not None and not _is_loader(index, "search") else "loading"
        self.error: str | None = None
        self._queue = JobQueue(max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._name = name
        self._seconds_per_job = 1.0  # running estimate (admission, Retry-After); refined after each job

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            if self.grounder is not None and (self.index is not None or self._index_source is None):
                self.state = "ready"  # a restart after stop(): nothing to load
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current batch, then fail whatever still waits (the server is going away)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_waiting(Overloaded("the server is shutting down", retry_after=5))
        if self.state != "failed":
            self.state = "stopped"

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def has_index(self) -> bool:
        return self._index_source is not None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds until the backlog has likely drained: (waiting + 1) jobs at the recent per-job time."""
        seconds = (self._queue.qsize() + 1) * self._seconds_per_job
        return max(1, min(120, math.ceil(seconds)))

    # ------------------------------------------------------------------ submission (event-loop side)
    def submit(self, job: GroundJob) -> None:
        if self.state == "loading":
            raise Overloaded("the model is still loading", retry_after=max(1, min(30, self.retry_after())))
        if self.state != "ready" or not self.alive:
            raise Overloaded(f"the model worker is not serving ({self.state})", retry_after=30)
        for dead in self._queue.drop_expired():
            self._skip(dead)
        # Admission control: work that would still be waiting when its deadline passes is refused now (503, the
        # client can go elsewhere) rather than accepted and answered 504 after using up its whole timeout.
        waiting = self._queue.qsize()
        expected_wait = waiting * self._seconds_per_job
        if waiting and expected_wait > job.deadline - time.monotonic():
            self.stats.rejected += 1
            raise Overloaded(f"the server is busy: the expected wait (~{expected_wait:.0f} s) exceeds the request "
                             "timeout", self.retry_after())
        try:
            self._queue.put_nowait(job)
        except QueueFull:
            self.stats.rejected += 1
            raise Overloaded(
                f"the server is busy: {self.max_queue} requests are already waiting", self.retry_after()
            ) from None

    def abandon(self, job: GroundJob) -> None:
        """The request gave up (timeout, disconnect): free its place in the queue now."""
        job.abandoned = True
        for dead in self._queue.drop_expired():
            self._skip(dead)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        try:
            if self.grounder is None:
                self.grounder = self._grounder_source()
            if self.index is None and self._index_source is not None:
                self.index = self._index_source()
            self.state = "ready"
        except Exception as exc:  # noqa: BLE001 - a failed load is reported by /readyz, not by a dead thread
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model worker failed to start: %s", self.error)
            return
        while not self._stop.is_set():
            first = self._queue.get(timeout=0.25)
            if first is None:
                continue
            jobs = [first]
            while len(jobs) < self.max_batch and (job := self._queue.get_nowait()) is not None:
                jobs.append(job)
            self.stats.batches += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(jobs))
            try:
                self.process(jobs)
            except Exception as exc:  # noqa: BLE001 - never let one bad turn kill the worker
                log.exception("model worker turn failed")
                for job in jobs:
                    self._resolve(job, exc=exc)

    def _fail_waiting(self, exc: Exception) -> None:
        while (job := self._queue.get_nowait()) is not None:
            self._resolve(job, exc=exc)

    def _skip(self, job: GroundJob) -> None:
        self.stats.skipped += 1
        self._resolve(job, exc=JobExpired("the request timed out while waiting for the model"))

    @staticmethod
    def _resolve(job: GroundJob, result: JobOutcome | None = None, exc: BaseException | None = None) -> None:
        def apply() -> None:
            if job.future.done():
                return
            if job.abandoned:  # nobody awaits it: cancel rather than leave an exception never retrieved
                job.future.cancel()
            elif exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

        # RuntimeError: the request's loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(apply)

    # ------------------------------------------------------------------ one worker turn
    def process(self, jobs: list[GroundJob]) -> None:
        """Run a turn's jobs back to back; documents they share are encoded once. Each job is answered as soon
        as it is done, and one job's failure stays with that job."""
        g = self.grounder
        base = (g.model_name, g.model_key, g.config.encoding_key())
        # Encodings made or fetched during this turn: they serve later jobs of the turn even when the cache is
        # disabled or a document is larger than the whole cache.
        turn: dict[tuple, Any] = {}
        for job in jobs:
            if job.expired():
                self._skip(job)
                continue
            started = time.perf_counter()
            try:
                outcome = self._run_job(job, base, turn)
            except GroundingCancelled:
                self.stats.cancelled += 1
                self._resolve(job, exc=JobExpired("the request timed out (its model work was stopped)"))
            except Exception as exc:  # noqa: BLE001
                self.stats.failed += 1
                if not isinstance(exc, CficError):
                    log.exception("grounding failed (request %s)", job.request_id)
                self._resolve(job, exc=exc)
            else:
                self.stats.processed += 1
                self._resolve(job, result=outcome)
            elapsed = time.perf_counter() - started
            self._seconds_per_job = 0.7 * self._seconds_per_job + 0.3 * elapsed

    def _run_job(self, job: GroundJob, base: tuple, turn: dict[tuple, Any]) -> JobOutcome:
        picked = time.monotonic()
        if job.documents is None:
            job.documents, job.retrieved = self._retrieve(job)
        keys = [encoding_cache_key(doc.text, *base) for doc in job.documents]
        missing: dict[tuple, Document] = {}
        for k, doc in zip(keys, job.documents, strict=True):
            if k in turn or k in missing:
                continue
            hit = self.cache.get(k)
            if hit is not None:
                turn[k] = hit
            else:
                missing[k] = doc
        reused = {k for k in keys if k in turn}
        # Best-first reading (LM-free start search, several documents): the grounder reads only the documents that
        # can hold the top evidence and hands each encoding it read to ``keep``; the others are never prefilled.
        lazy = job.hops == 1 and self.grounder.reads_best_first(len(job.documents), abstain=job.abstain)
        encode_ms = 0.0
        if missing and not lazy:
            t0 = time.perf_counter()
            encodings = self.grounder.encode(list(missing.values()), cancel=job.expired)
            encode_ms = (time.perf_counter() - t0) * 1000
            for k, enc in zip(missing, encodings, strict=True):
                turn[k] = enc
                self.cache.put(k, enc)
        if job.expired():  # the prefill is cached for a retry; the grounding would be answered to nobody
            raise GroundingCancelled("the request timed out")
        inputs: list[Any] = []
        cached_tokens = 0
        seen: set[tuple] = set()
        for i, (k, doc) in enumerate(zip(keys, job.documents, strict=True)):
            enc = turn.get(k)
            if enc is None:  # best first: the grounder plans it, and reads it only if it needs it
                inputs.append(doc)
                continue
            # Document tokens this request did not prefill itself: reused ones, and repeats within the request.
            if k in reused or k in seen:
                cached_tokens += enc.n_tokens
            seen.add(k)
            doc_id = doc.id if doc.id is not None else str(i)
            if enc.document_id != doc_id or enc.metadata != doc.metadata:
                enc = replace(enc, document_id=doc_id, metadata=dict(doc.metadata))
            inputs.append(enc)
        read: list[int] = []

        def keep(i: int, enc: Any) -> None:  # an encoding the grounder just read: cached at once (kept on cancel)
            read.append(i)
            turn[keys[i]] = enc
            self.cache.put(keys[i], enc)

        result = self.grounder.ground(job.query, inputs, top_k=job.top_k,
                                      max_span_tokens=job.max_span_tokens, threshold=job.threshold,
                                      abstain=job.abstain, cancel=job.expired, on_read=keep if lazy else None,
                                      use_attention=job.use_attention, hops=job.hops)
        if lazy:  # only the documents the grounder used count, as in ``input_tokens``
            cached_tokens = result.usage.cached_tokens
            encode_ms = result.usage.encode_ms if read else 0.0
        return JobOutcome(result, cached_tokens, encode_ms, (picked - job.enqueued) * 1000, job.retrieved)

    def _retrieve(self, job: GroundJob) -> tuple[list[Document], list[Retrieved]]:
        if self.index is None:
            raise CficError("this server has no index: send `documents` with the request")
        k = job.top_documents or 3
        hits = self.index.search(job.query, k)
        docs: list[Document] = []
        retrieved: list[Retrieved] = []
        for position, hit in enumerate(list(hits)[:k]):
            doc, score = _hit_document(hit, position)
            docs.append(doc)
            retrieved.append(Retrieved(doc.id, doc.text, doc.metadata, score))
        if not docs:
            raise CficError("the index found no documents for this query")
        return docs, retrieved


def _hit_document(hit: Any, position: int) -> tuple[Document, float | None]:
    """The document of one search hit (an object with attributes, or a mapping) and its score. The document
    goes through ``as_document``, the coercion every other entry point uses (ids as strings, metadata a dict)."""
    get = hit.get if isinstance(hit, dict) else (lambda name, default=None: getattr(hit, name, default))
    if get("text") is None:
        raise CficError("the index returned a hit without document text")
    fields = {"id": get("document_id") or get("id") or get("doc_id"), "text": get("text"),
              "metadata": get("metadata")}
    score = get("score")
    return as_document(fields, position), None if score is None else float(score)
