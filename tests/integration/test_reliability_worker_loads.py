"""What a model thread remembers of residual loads: only loads still running, and failures still
to be told to the requests that waited for them.

The server's own parts (real store, engines, loader, cache, catalog, batcher, model workers) are
driven step by step, the way the model threads' loop runs them, so the order of events is the
same every time.
"""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import reliability_support as rs
import torch

from residual_store import BaseSpec
from residual_store.stores import open_store
from server.batcher import Batcher, PendingRequest
from server.cache import ResidualCache
from server.catalog import Catalog
from server.engine import SwapEngine
from server.loader import ResidualLoader
from server.worker import BatchResult, ModelWorker

pytestmark = pytest.mark.integration


class Server:
    """One store's tasks served by `streams` model workers that share batcher, cache, catalog."""

    def __init__(self, store_url: str, streams: int = 1, hold: tuple = ()):
        self.store = open_store(store_url)
        engine = SwapEngine(BaseSpec(rs.MODEL), "cpu")
        engine.setup()
        self.batcher = Batcher(max_batch=8, max_wait_s=0.01, max_queue=64, streams=streams)
        loader = ResidualLoader(self.store, engine, None)
        self.load = rs.Held(loader, *hold) if hold else loader
        self.loads_ended = threading.Semaphore(0)

        def on_change():  # the cache's hook: wake the model threads, and the test
            self.batcher.notify()
            self.loads_ended.release()

        self.cache = ResidualCache(1 << 30, self.load, on_change=on_change)
        self.catalog = Catalog(self.store, self.cache, engine.fingerprint, on_change=self.batcher.notify)
        engines = [engine] + [engine.replica() for _ in range(streams - 1)]
        self.workers = [ModelWorker(e, self.cache, self.catalog, self.batcher) for e in engines]
        self.catalog.reconcile()

    def submit(self, task: str) -> tuple[PendingRequest, list]:
        answers: list = []
        now = self.batcher.clock()
        request = PendingRequest(task, rs.tensors(rs.IMAGES[:1]), now, now + 120, answers.append)
        self.batcher.submit(request)
        return request, answers

    def close(self) -> None:
        self.cache.close()
        self.store.close()


def test_a_load_the_other_model_thread_served_is_not_kept(tmp_path):
    """--streams 2: thread 0 starts a load, thread 1 runs the task's batch. Once the cache
    evicted the residual, nothing in thread 0 may keep it (device memory beyond --cache-bytes)."""
    root = str(tmp_path / "store")
    v1 = rs.publish_versions(root, ["A"], first_seed=81)["A"]
    srv = Server(root, streams=2)
    first, second = srv.workers
    _, answers = srv.submit("A")
    assert first._step() is False  # A is cold: thread 0 starts its load, nothing to run yet
    assert srv.loads_ended.acquire(timeout=60)
    assert second._step() is True  # thread 1 runs A's batch
    assert isinstance(answers[0], BatchResult), answers
    torch.testing.assert_close(answers[0].scores[0], v1.expected[0], atol=1e-5, rtol=0)
    key = srv.catalog.get("A").key
    resident = weakref.ref(srv.cache.peek(key))
    assert srv.cache.evict(key)
    first._step()  # thread 0 wakes (a notification, or its idle timeout) with nothing to do
    gc.collect()
    assert resident() is None, "a model thread still holds the evicted residual"
    srv.close()


def test_a_failed_load_nobody_waited_for_does_not_fail_a_later_request(tmp_path):
    """A load fails (the store is down) after its only request gave up; the store comes back.
    The next request loads again and gets its answer, not the old failure."""
    redis_srv = rs.PrivateRedis(tmp_path).start()
    url = f"{redis_srv.url}?prefix=uda-loads:"
    try:
        v1 = rs.publish_versions(url, ["A"], first_seed=82)["A"]
        srv = Server(url, hold=("A",))
        (worker,) = srv.workers
        request, answers = srv.submit("A")
        assert worker._step() is False  # starts A's load, held open in the loader
        assert srv.load.arrived.wait(60)
        srv.batcher.cancel(request)  # its client gave up
        assert srv.batcher.depth == 0
        worker._step()
        assert answers == []  # nobody waits for an answer
        redis_srv.stop()
        srv.load.release.set()  # the load reads the store now, and fails
        assert srv.loads_ended.acquire(timeout=60)
        worker._step()  # what the wake-up after the failed load runs: nobody waits for A
        redis_srv.restart()
        rs.wait_for("the store back", lambda: srv.store.ping() or True)

        _, answers = srv.submit("A")
        assert worker._step() is False
        assert answers == [], answers  # not failed with the old error: a new load started
        assert srv.loads_ended.acquire(timeout=60)
        assert worker._step() is True
        assert isinstance(answers[0], BatchResult), answers
        torch.testing.assert_close(answers[0].scores[0], v1.expected[0], atol=1e-5, rtol=0)
        srv.close()
    finally:
        redis_srv.stop()
