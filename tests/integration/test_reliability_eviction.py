"""Issue 6, point 4: eviction during use, with a cache that holds one residual.

A batch in flight keeps its residual even when the cache evicts it (admin unload, or another
task's load) and answers correctly; under mixed traffic over three tasks every answer is right
and the resident bytes never exceed --cache-bytes. A new version of a pinned task replaces the
old one in a budget that holds the pinned task only once.
"""
from __future__ import annotations

import concurrent.futures
import threading

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

TASKS = ("A", "B", "C")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    versions = rs.publish_versions(str(root), TASKS, first_seed=30)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0,
                      cache_bytes=rs.cache_budget(1.5, *versions.values()),  # one fits, never two
                      admin_token=rs.ADMIN_TOKEN, max_batch=4)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        yield srv, http, versions


def test_a_batch_in_flight_survives_the_eviction_of_its_residual(served):
    srv, http, versions = served
    assert rs.predict(http, "A").status_code == 200
    hits = rs.metric(srv, "uda_residual_cache_hits_total")
    lock = srv.runtime.engine._lock
    lock.acquire()  # the next batch stops right before its swap, holding A's entry
    held = True
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(rs.predict, http, "A", 1)
            rs.wait_for("A's batch picked", lambda: rs.metric(srv, "uda_residual_cache_hits_total") > hits)
            resp = http.post("/admin/tasks/A/unload", headers=rs.admin())
            assert resp.status_code == 200 and resp.json()["resident"] is False
            # The model thread is blocked, so B is loaded through the admin route: it fills
            # the one-entry cache while A's batch still waits to run.
            resp = http.post("/admin/tasks/B/load", headers=rs.admin())
            assert resp.status_code == 200 and resp.json()["resident"] is True
            assert srv.runtime.cache.resident_tasks() == {"B"}
            lock.release()
            held = False
            a, b = in_flight.result(60), rs.predict(http, "B", 2)
    finally:
        if held:
            lock.release()
    assert a.status_code == 200 and rs.matches(a, versions["A"], 1)
    assert b.status_code == 200 and rs.matches(b, versions["B"], 2)
    assert srv.runtime.cache.bytes_used <= srv.runtime.config.cache_bytes


def test_mixed_traffic_with_a_one_entry_cache(served):
    srv, _, versions = served
    budget = srv.runtime.config.cache_bytes
    over, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            used = srv.runtime.cache.bytes_used
            gauge = rs.metric(srv, "uda_residual_cache_bytes") or 0
            if used > budget or gauge > budget or len(srv.runtime.cache) > 1:
                over.append((used, gauge, len(srv.runtime.cache)))

    def client(i):
        out = []
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for j in range(8):
                task, image = TASKS[(i + j) % 3], (i * j) % len(rs.IMAGES)
                out.append((task, image, rs.predict(c, task, image)))
        return out

    sampler = threading.Thread(target=sample)
    sampler.start()
    evictions = rs.metric(srv, "uda_residual_cache_evictions_total")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = [x for part in pool.map(client, range(4)) for x in part]
    finally:
        stop.set()
        sampler.join()
    assert not over, over[:5]
    for task, image, resp in results:
        assert resp.status_code == 200, resp.text
        assert rs.matches(resp, versions[task], image), (task, image)
    assert rs.metric(srv, "uda_residual_cache_evictions_total") > evictions
    assert srv.runtime.engine.fingerprint_now() == srv.runtime.engine.fingerprint


def test_a_new_version_of_a_pinned_task_is_served_in_a_budget_sized_to_the_pin(tmp_path):
    """--cache-bytes holds the pinned task once, not twice: v2 replaces v1 once it loaded."""
    v1, v2 = rs.make_version("P", 61), rs.make_version("P", 62)
    store = open_store(str(tmp_path / "store"))
    store.publish("P", v1.blob)
    budget = rs.cache_budget(1.5, v1, v2)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(tmp_path / "store"), port=0, pin=("P",),
                      cache_bytes=budget, reconcile_interval=0.2)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.matches(rs.predict(http, "P"), v1)
        info = store.publish("P", v2.blob)
        # Before the fix every reconcile loaded v2 and dropped it (CacheFull): 30 s is plenty.
        resp = rs.wait_for("v2 served", lambda: (r := rs.predict(http, "P")).json()["version"] == info.version
                           and r, timeout=30)
        assert rs.matches(resp, v2)
        entry = http.get("/tasks").json()["tasks"][0]
        assert entry["resident"] and entry["pinned"] and entry["version"] == info.version
        assert srv.runtime.cache.keys() == [("P", v2.sha256)]
        assert srv.runtime.cache.bytes_used <= budget
    store.close()
