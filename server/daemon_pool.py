"""A few daemon threads running background store reads (residual loads, version checks).

concurrent.futures.ThreadPoolExecutor's threads are joined at interpreter exit, and its
shutdown(wait=True) waits for every running call: one read stuck on a hung store (an NFS mount,
a Redis that stopped answering) would keep the server from ever exiting, the forced quit
included. Here `close` waits a bounded time and the threads are daemons.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)


class DaemonPool:
    def __init__(self, workers: int, name: str, initializer: Callable[[], Any] | None = None):
        self._name = name
        self._initializer = initializer  # run first on each thread, as ThreadPoolExecutor's
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Future of `fn(*args)` run on one of the threads; once closed, a cancelled one (like
        the calls still queued when it closed)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.cancel()
            else:
                self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (item := self._queue.get()) is not None:
            self._run(*item)
            # An idle thread must not keep the last call's arguments and result alive (a
            # residual the cache has evicted since).
            del item

    @staticmethod
    def _run(future: Future, fn: Callable[..., Any], args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the future's owner, never lost in the pool
            future.set_exception(e)
        else:
            future.set_result(result)

    def close(self, timeout: float) -> None:
        """Cancel what has not started; wait up to `timeout` seconds for what runs."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # nothing is queued from here on
        while True:
            try:
                future, _, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in self._threads)
        if stuck:
            logger.warning("%s: %d call(s) still running after %.0f s (a hung store read?); "
                           "not waiting for them", self._name, stuck, timeout)
