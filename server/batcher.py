"""Per-task request queues and the scheduling policy that turns them into batches.

Policy (`pick`): among tasks whose residual is ready, serve the task whose oldest request has
waited longest, taking up to `max_batch` images of that task's requests in arrival order. The
task whose residual is applied right now is preferred (no swap needed) only while no other
ready task's oldest request has waited more than `max_wait_s` longer than the applied task's
oldest request. So a flood of one task delays another by at most `max_wait_s` plus one batch.
With `streams` model threads taking from one batcher, a batch holds at most its thread's share of
all queued images, ceil(queued / streams): one thread must not take a whole one-task queue into
a long one-thread forward pass while another idles and the requests at its end wait. The share
counts every task's images, so with many tasks a task's few requests still go in one batch
(splitting them would make both threads swap to it).

The queue is bounded in total (QueueFull -> 429). Thread-safe: the event loop submits, the
model thread picks; both under one Condition that also wakes the model thread.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from server.errors import QueueFull, ShuttingDown


@dataclasses.dataclass(eq=False)
class PendingRequest:
    """One HTTP request's images for one task, waiting for the model thread."""

    task: str
    images: torch.Tensor  # (n, 3, S, S), preprocessed
    enqueued: float  # batcher clock at submit
    deadline: float  # batcher clock after which nobody waits for the answer any more
    resolve: Callable[[Any], None]  # thread-safe: result object or exception
    # A TaskVersion other than the served one, asked for by version (OIP's versions/V/infer);
    # None: whatever version of `task` is served when the batch runs.
    pinned: Any = None

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def queue(self) -> str:
        """The queue it waits in: its task's, or `task@version` for a pinned version (task names
        have no `@`), so a batch never mixes two versions of a task."""
        return self.task if self.pinned is None else f"{self.task}@{self.pinned.version}"


class Batcher:
    """One FIFO queue per task, a total bound, and the batch-picking policy."""

    def __init__(self, max_batch: int, max_wait_s: float, max_queue: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_depth: Callable[[int], None] | None = None, streams: int = 1):
        self.max_batch = max_batch
        self.streams = streams
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.clock = clock
        self._on_depth = on_depth or (lambda depth: None)
        self._queues: dict[str, deque[PendingRequest]] = {}
        self._depth = 0
        self._closed = False
        self.cond = threading.Condition()
        # Bumped on every notification, under `cond`: a model thread that read it before looking
        # at the queues sleeps only if nothing happened since (see wait).
        self._changes = 0

    # -- producer side --------------------------------------------------------------------------

    def submit(self, request: PendingRequest) -> None:
        """Queue `request`; QueueFull at the bound, ShuttingDown after close()."""
        with self.cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if self._depth >= self.max_queue:
                raise QueueFull(f"{self._depth} requests queued (--max-queue {self.max_queue}); "
                                "retry shortly")
            self._queues.setdefault(request.queue, deque()).append(request)
            self._depth += 1
            self._on_depth(self._depth)
            self._wake()

    def cancel(self, request: PendingRequest) -> None:
        """Nobody waits for `request` any more (its client gave up or left): it leaves the queue
        now, so it holds no --max-queue slot until the model thread's next look. One already
        taken into a batch runs; its answer is dropped."""
        with self.cond:
            q = self._queues.get(request.queue)
            if q is None or request not in q:  # eq=False: identity
                return
            q.remove(request)
            if not q:
                del self._queues[request.queue]
            self._depth -= 1
            self._on_depth(self._depth)

    def close(self) -> None:
        """Refuse new requests; queued ones stay for the model thread to finish."""
        with self.cond:
            self._closed = True
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def notify(self) -> None:
        """Wake the model thread (a residual finished loading, the catalog changed...)."""
        with self.cond:
            self._wake()

    def _wake(self) -> None:
        self._changes += 1
        self.cond.notify_all()

    # -- consumer side (model thread) -------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._depth

    def pending_tasks(self) -> list[str]:
        """Queues holding requests: task names, and `task@version` for pinned versions."""
        with self.cond:
            return [task for task, q in self._queues.items() if q]

    def head(self, queue: str) -> PendingRequest | None:
        """The first request waiting in `queue`, if any."""
        with self.cond:
            q = self._queues.get(queue)
            return q[0] if q else None

    def oldest(self, task: str) -> float | None:
        with self.cond:
            q = self._queues.get(task)
            return q[0].enqueued if q else None

    def pick(self, current: str | None, ready: Callable[[str], bool]
             ) -> tuple[str, list[PendingRequest]] | None:
        """The next batch as (task, requests), or None when no queued task is ready."""
        with self.cond:
            heads = {t: q[0].enqueued for t, q in self._queues.items() if q and ready(t)}
            if not heads:
                return None
            task = min(heads, key=heads.__getitem__)
            if current in heads and current != task and \
                    heads[task] >= heads[current] - self.max_wait_s:
                task = current  # nobody waited max_wait longer than the applied task: no swap
            return task, self._take(task)

    def _take(self, task: str) -> list[PendingRequest]:
        q = self._queues[task]
        limit = self.max_batch
        if self.streams > 1:
            queued = sum(r.n for other in self._queues.values() for r in other)
            limit = min(limit, -(-queued // self.streams))
        batch, images = [], 0
        while q and (not batch or images + q[0].n <= limit):
            request = q.popleft()
            batch.append(request)
            images += request.n
        if not q:
            del self._queues[task]
        self._depth -= len(batch)
        self._on_depth(self._depth)
        return batch

    def take_all(self, task: str | None = None) -> list[PendingRequest]:
        """Remove and return every queued request (of `task`, or of all tasks)."""
        with self.cond:
            tasks = [task] if task is not None else list(self._queues)
            out: list[PendingRequest] = []
            for t in tasks:
                out.extend(self._queues.pop(t, ()))
            self._depth -= len(out)
            self._on_depth(self._depth)
            return out

    def take_expired(self, now: float | None = None) -> list[PendingRequest]:
        """Remove and return requests past their deadline."""
        now = self.clock() if now is None else now
        with self.cond:
            out: list[PendingRequest] = []
            for task in list(self._queues):
                q = self._queues[task]
                keep = deque(r for r in q if r.deadline > now)
                if len(keep) != len(q):
                    out.extend(r for r in q if r.deadline <= now)
                    if keep:
                        self._queues[task] = keep
                    else:
                        del self._queues[task]
            if out:
                self._depth -= len(out)
                self._on_depth(self._depth)
            return out

    def next_deadline(self) -> float | None:
        with self.cond:
            deadlines = [r.deadline for q in self._queues.values() for r in q]
            return min(deadlines) if deadlines else None

    @property
    def changes(self) -> int:
        """How many notifications so far: read it before looking at the queues, pass it to wait."""
        return self._changes

    def wait(self, timeout: float, seen: int) -> None:
        """Sleep until a notification after `seen` (an earlier `changes`) or `timeout` seconds
        pass. The model thread looks at the queues without the lock held: a submit or a finished
        load between that look and this call has bumped `changes`, so it returns at once instead
        of sleeping the full timeout."""
        with self.cond:
            self.cond.wait_for(lambda: self._changes != seen, timeout)
