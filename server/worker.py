"""The model thread: the only code that touches its engine's base weights.

With --streams N there are N model threads, each owning one engine (a replica of the base);
they share the batcher, so a batch is taken by exactly one of them.

Loop: drop expired requests -> for each queued task make sure its current residual is resident
(else start a background load and serve other tasks meanwhile) -> pick a batch (batcher
policy) -> swap + forward (engine) -> hand each request its scores through its resolve callback.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from residual_store.errors import UnknownTask
from server.batcher import Batcher, PendingRequest
from server.cache import CachedResidual, LoadState
from server.catalog import TaskVersion
from server.errors import RequestTimeout, ShuttingDown, TaskUnavailable
from server.loader import refusal_reason
from server.torch_threads import cores, use_cores

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.25  # longest sleep without a notification (deadlines are checked on wake-up)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """What one request gets back from the model thread."""

    task: str
    version: int
    classes: tuple[str, ...]
    scores: torch.Tensor  # (n, C) softmax probabilities, CPU float32
    queue_ms: float
    swap_ms: float
    model_ms: float


@dataclasses.dataclass(frozen=True)
class ReadyTask:
    """A queue whose residual is resident: the version its requests run, and its entry."""

    version: TaskVersion
    entry: CachedResidual


class ModelWorker:
    """Runs the scheduler loop in one dedicated thread."""

    def __init__(self, engine, cache, catalog, batcher: Batcher, metrics=None, name: str = "uda-model",
                 cores: int | None = None):
        self.engine = engine
        self.cores = cores  # torch threads this model thread asks for; None: torch's setting as it is
        self.cores_in_use: int | None = None  # as the thread reads it back once started
        self.cache = cache
        self.catalog = catalog
        self.batcher = batcher
        self.metrics = metrics
        self.name = name
        self._thread: threading.Thread | None = None
        self._stop_at: float | None = None  # monotonic deadline of a drain
        self.batches = 0
        self.swaps = 0

    def start(self) -> None:
        """Start the thread; returns once it took its cores (server/torch_threads.py)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_thread, args=(ready,), name=self.name,
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def _run_thread(self, ready: threading.Event) -> None:
        if self.cores is not None:
            use_cores(self.cores)
        self.cores_in_use = cores()
        ready.set()
        self._loop()

    def stop(self, grace: float) -> None:
        """Refuse new requests, finish queued ones within `grace` seconds, fail the rest."""
        self.begin_stop(grace)
        self.finish_stop(grace)

    def begin_stop(self, grace: float) -> None:
        """Refuse new requests; the thread drains the queue until it is empty or `grace` passes.

        Model threads sharing one batcher all begin before any finishes, so they drain together.
        """
        self.batcher.close()
        self._stop_at = time.monotonic() + grace
        self.batcher.notify()

    def finish_stop(self, grace: float) -> int:
        """Wait for the thread, fail what is still queued, put the exact base weights back;
        the number of requests failed that way."""
        if self._thread is not None:
            self._thread.join(timeout=grace + 30)
        dropped = self.batcher.take_all()
        for request in dropped:
            request.resolve(ShuttingDown("the server stopped before this request ran"))
        self.engine.restore()
        return len(dropped)

    @property
    def _loads(self):
        """The loads this thread's requests wait for (the cache holds them): key -> future."""
        return self.cache.watched_loads()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            seen = self.batcher.changes  # before anything is looked at: see Batcher.wait
            if self._stop_at is not None and (self.batcher.depth == 0 or time.monotonic() > self._stop_at):
                return
            try:
                ran = self._step()
            except Exception:  # the model thread must survive; the failed batch got its error
                logger.exception("model thread step failed")
                ran = True
            if not ran:
                self.batcher.wait(self._sleep_s(), seen)

    def _sleep_s(self) -> float:
        deadline = self.batcher.next_deadline()
        if deadline is None:
            return _IDLE_WAIT_S
        return min(_IDLE_WAIT_S, max(0.001, deadline - self.batcher.clock()))

    def _step(self) -> bool:
        for request in self.batcher.take_expired():
            request.resolve(RequestTimeout("the request waited longer than --request-timeout"))
        ready = self._ready_tasks()
        applied = self.engine.applied_key
        picked = self.batcher.pick(applied[0] if applied else None, ready.__contains__)
        if picked is None:
            return False
        task, requests = picked
        self._run(ready[task], requests)
        return True

    def _ready_tasks(self) -> dict[str, ReadyTask]:
        """queue -> ReadyTask for queues whose residual is resident; starts loads for the others
        and fails requests whose task (or pinned version) cannot be served."""
        ready = {}
        queues = self.batcher.pending_tasks()
        pending = {queue.partition("@")[0] for queue in queues}
        # Failures are kept only while requests of their task wait: told to those, not to
        # later requests, which load again.
        self.cache.forget_failures(lambda key: key[0] in pending)
        for task in queues:
            try:
                tv = self._version_of(task)
            except (UnknownTask, TaskUnavailable) as e:  # deleted, or refused, since it was queued
                self._fail_task(task, e)
                continue
            if tv is None:  # a pinned queue emptied meanwhile (its client left)
                continue
            status = self.cache.status(tv.key, watch=True)
            if status.state is LoadState.RESIDENT:
                ready[task] = ReadyTask(tv, status.entry)
            elif status.state is LoadState.ABSENT:
                self.cache.load_async(tv.task, tv.version, tv.sha256, watch=True)
            elif status.state is LoadState.FAILED:
                self._load_failed(task, tv, status.error)
        return ready

    def _load_failed(self, queue: str, tv: TaskVersion, error: BaseException) -> None:
        if queue != tv.task:  # a pinned version failed: only it is at fault
            self.cache.forget_failure(tv.key)
            self._fail_task(queue, self._unavailable(tv, error))
            return
        # A version trimmed by newer publishes before it was loaded: serve the newest (one store
        # read on this thread, only on that rare path). While the newest is still staging, the
        # failure stays put so the trimmed version is not fetched again; the requests wait
        # (bounded by --request-timeout).
        if isinstance(error, UnknownTask) and self.catalog.catch_up(queue):
            return
        self.cache.forget_failure(tv.key)
        self.catalog.refuse_loaded(tv, error)  # a bad file is not fetched again
        self._fail_task(queue, self._unavailable(tv, error))

    def _version_of(self, queue: str) -> TaskVersion | None:
        """The TaskVersion a queue's requests run: the served one, or the version its requests
        pinned (the task must still be served: a deleted task takes its versions along)."""
        task, _, pinned = queue.partition("@")
        served = self.catalog.require(task)
        if not pinned:
            return served
        head = self.batcher.head(queue)
        return head.pinned if head is not None else None

    @staticmethod
    def _unavailable(tv, error: BaseException) -> Exception:
        if isinstance(error, TaskUnavailable):
            return error
        reason = refusal_reason(error)
        if reason is not None:
            return TaskUnavailable(f"task {tv.task!r} v{tv.version} was refused ({reason}): {error}")
        return TaskUnavailable(f"task {tv.task!r} v{tv.version} could not be loaded: {error}")

    def _fail_task(self, task: str, error: Exception) -> None:
        for request in self.batcher.take_all(task):
            request.resolve(error)

    def _run(self, ready: ReadyTask, requests: list[PendingRequest]) -> None:
        tv, entry = ready.version, ready.entry
        if requests[0].pinned is None:  # the task's other loads are told no one now
            self.cache.unwatch_task(tv.task)
        self.cache.get(entry.key)  # mark most recently used
        if self.metrics is not None:
            self.metrics.cache_hit()
        started = self.batcher.clock()
        try:
            batch = torch.cat([r.images for r in requests])
            logits, timing = self.engine.run(entry.key, entry.flat, entry.head, batch)
            scores = torch.softmax(logits, dim=-1)
        except Exception as e:
            logger.exception("batch of %d images for %s failed", sum(r.n for r in requests), tv.task)
            for request in requests:
                request.resolve(e)
            return
        self.batches += 1
        if timing.swapped:
            self.swaps += 1
        swap_ms, model_ms = timing.swap_s * 1e3, timing.model_s * 1e3
        start = 0
        for request in requests:
            request.resolve(BatchResult(
                task=tv.task, version=tv.version, classes=entry.classes,
                scores=scores[start:start + request.n], queue_ms=(started - request.enqueued) * 1e3,
                swap_ms=swap_ms, model_ms=model_ms))
            start += request.n
        if self.metrics is not None:
            self.metrics.observe_batch(int(batch.shape[0]), timing.swap_s if timing.swapped else None)
