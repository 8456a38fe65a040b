"""A served version trimmed from the store before this server loaded it, while the newest
version is still staging: the waiting requests get the newest version, not a 503.

Found by test_racing_publishers (a CI run on 2026-12-01): the server knew A at an old version,
cold; newer publishes trimmed it (the store keeps 5); the request's load failed, and the
catch-up read the store's newest version while a follower was already staging it, so it changed
nothing and the request failed with 503. Racing publishers hit that order now and then; here
the server's own parts (real store, engine, loader, cache, catalog, model worker) are driven
step by step, with the follower's check of the newest version (the real
`ResidualLoader.verify`) held open, so the failing order happens every time.
"""
from __future__ import annotations

import threading
import time

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


def test_requests_wait_for_the_staging_version_when_theirs_was_trimmed(tmp_path):
    store = open_store(str(tmp_path / "store"))
    versions = [rs.make_version("A", 300 + i) for i in range(7)]  # v1 .. v7; the store keeps 5
    store.publish("A", versions[0].blob)
    newest = len(versions)

    engine = SwapEngine(BaseSpec(rs.MODEL), "cpu")
    engine.setup()
    batcher = Batcher(max_batch=8, max_wait_s=0.01, max_queue=64)
    loader = ResidualLoader(store, engine, None)
    cache = ResidualCache(1 << 30, loader, on_change=batcher.notify)
    staging, release = threading.Event(), threading.Event()

    def verify(task, version, sha256):  # the real check, held open for the newest version
        if version == newest:
            staging.set()
            assert release.wait(60)
        loader.verify(task, version, sha256)

    catalog = Catalog(store, cache, engine.fingerprint, on_change=batcher.notify, verify=verify)
    worker = ModelWorker(engine, cache, catalog, batcher)
    catalog.reconcile()
    served = catalog.get("A")
    assert served.version == 1 and cache.peek(served.key) is None  # known, cold

    for v in versions[1:]:
        store.publish("A", v.blob)
    assert min(v.version for v in store.versions("A")) > 1  # v1 is trimmed
    info = store.info("A")
    follower = threading.Thread(target=catalog.consider, args=("A", info.version, info.sha256))
    follower.start()  # what the event follower does on the publish event
    assert staging.wait(60)

    answers = []
    try:
        now = batcher.clock()
        batcher.submit(PendingRequest("A", rs.tensors(rs.IMAGES[:1]), now, now + 120, answers.append))

        def step_until(what, done):
            deadline = time.monotonic() + 120  # bounds a hang only; nothing asserts durations
            while not done():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                worker._step()
                time.sleep(0.01)

        step_until("the load of the trimmed v1 to fail",
                   lambda: (f := worker._loads.get(served.key)) is not None and f.done())
        failed = worker._loads[served.key]
        assert failed.exception() is not None
        for _ in range(5):  # the failure is seen: the request keeps waiting, v1 is not fetched again
            worker._step()
        assert answers == [], answers
        assert worker._loads[served.key] is failed

        release.set()
        follower.join(60)
        rs.wait_for("the newest version checked and served", lambda: catalog.get("A").version == newest)
        step_until("the answer", lambda: answers)
    finally:
        release.set()  # never leave the follower blocked, even when an assertion failed
        follower.join(60)

    store.close()
    result = answers[0]
    assert isinstance(result, BatchResult), result
    assert result.version == newest
    torch.testing.assert_close(result.scores[0], versions[-1].expected[0], atol=1e-5, rtol=0)
    assert served.key not in worker._loads  # the trimmed version's failed load is forgotten
    assert engine.fingerprint_now() == engine.fingerprint
