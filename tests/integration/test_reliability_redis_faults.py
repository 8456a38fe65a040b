"""Issue 6, point 5: missed events, Redis restarted empty, Redis down for a while.

Each test runs its own redis-server (never the shared one) so it can kill its subscriptions,
stop it, and restart it with or without its data.
"""
from __future__ import annotations

import logging

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

PREFIX = "uda-faults:"
RECONCILE_S = 0.5


@pytest.fixture
def redis_srv(tmp_path):
    srv = rs.PrivateRedis(tmp_path).start()
    yield srv
    srv.stop()


def _server(redis_srv, **kw):
    url = f"{redis_srv.url}?prefix={PREFIX}"
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=url, port=0, reconcile_interval=RECONCILE_S, **kw)
    return url, EmbeddedServer(cfg)


def _subscribers(redis_srv) -> int:
    c = redis_srv.client()
    try:
        return dict(c.pubsub_numsub(f"{PREFIX}events"))[f"{PREFIX}events".encode()]
    finally:
        c.close()


def test_missed_events_converge_by_reconcile(redis_srv):
    v1, v2, v3 = (rs.make_version("A", s) for s in (1, 2, 3))
    url, embedded = _server(redis_srv)
    store = open_store(url)
    store.publish("A", v1.blob)
    with embedded as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").json()["version"] == 1
        rs.wait_for("the server's subscription", lambda: _subscribers(redis_srv) == 1)
        admin = redis_srv.client()
        assert admin.client_kill_filter(_type="pubsub") >= 1  # drop the server's subscription
        # Publish with no event at all: only reconciling can find it.
        version = rs.raw_publish(admin, PREFIX, "A", v2.blob, dict(v2.residual.metadata), event=False)
        resp = rs.wait_for("v2 served without its event", lambda: (r := rs.predict(http, "A")).json()["version"] == version and r)
        assert rs.matches(resp, v2)
        rs.wait_for("the subscription is back", lambda: _subscribers(redis_srv) == 1)
        # A normal publish (with its event) after the reconnect is served too.
        info = store.publish("A", v3.blob)
        resp = rs.wait_for("v3 served", lambda: (r := rs.predict(http, "A")).json()["version"] == info.version and r)
        assert rs.matches(resp, v3)
        admin.close()
    store.close()


def test_redis_restarted_empty_keeps_serving_from_cache(redis_srv, caplog):
    a1, b1, a2 = rs.make_version("A", 1), rs.make_version("B", 2), rs.make_version("A", 4)
    url, embedded = _server(redis_srv)
    store = open_store(url)
    store.publish("A", a1.blob)
    store.publish("A", a1.blob)  # v2, same bytes: after the restart "A" starts again at v1
    store.publish("B", b1.blob)
    with embedded as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for task, v in (("A", a1), ("B", b1)):
            assert rs.matches(rs.predict(http, task), v)
        with caplog.at_level(logging.WARNING, logger="server.catalog"):
            redis_srv.restart(empty=True)
            ready = rs.wait_for("readyz reports the empty store", lambda: (
                r := http.get("/readyz")).status_code == 503 and "no tasks" in r.json()["detail"] and r)
        assert "republish" in ready.json()["detail"]
        assert rs.metric(srv, "uda_store_tasks_missing") == 2
        assert any("no tasks" in r.getMessage() for r in caplog.records), caplog.text
        for _ in range(3):  # still served, bit for bit, from the cache
            for task, v in (("A", a1), ("B", b1)):
                resp = rs.predict(http, task)
                assert resp.status_code == 200 and rs.matches(resp, v)
        assert all(w.alive for w in srv.runtime.workers) and srv.runtime.catalog._threads[0].is_alive()
        # Republished into the empty Redis: numbering starts again, and the server follows.
        info = store.publish("A", a2.blob)
        assert info.version == 1
        resp = rs.wait_for("the republished A served", lambda: (r := rs.predict(http, "A")).json()["version"] == 1 and rs.matches(r, a2) and r)
        assert resp
        store.publish("B", b1.blob)
        rs.wait_for("ready again", lambda: http.get("/readyz").status_code == 200)
        assert rs.metric(srv, "uda_store_tasks_missing") == 0
        assert rs.matches(rs.predict(http, "B"), b1)
        assert srv.runtime.engine.fingerprint_now() == srv.runtime.engine.fingerprint
    store.close()


def test_redis_down_for_a_while(redis_srv):
    versions = {t: rs.make_version(t, 10 + i) for i, t in enumerate(("Hot", "Cold"))}
    url, embedded = _server(redis_srv)
    store = open_store(url)
    for task, v in versions.items():
        store.publish(task, v.blob)
    with embedded as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.matches(rs.predict(http, "Hot"), versions["Hot"])  # Cold is known, not resident
        redis_srv.stop()
        rs.wait_for("readyz says the store is down", lambda: http.get("/readyz").status_code == 503)
        assert rs.metric(srv, "uda_store_up") == 0
        for i in range(6):
            hot = rs.predict(http, "Hot", i % 3)
            assert hot.status_code == 200 and rs.matches(hot, versions["Hot"], i % 3)
        cold = rs.predict(http, "Cold")
        assert cold.status_code == 503 and cold.headers["retry-after"], cold.text
        redis_srv.start()  # same port, same data (AOF)
        rs.wait_for("ready again", lambda: http.get("/readyz").status_code == 200)
        assert rs.metric(srv, "uda_store_up") == 1
        resp = rs.wait_for("Cold served", lambda: (r := rs.predict(http, "Cold")).status_code == 200 and r)
        assert rs.matches(resp, versions["Cold"])
        new = rs.make_version("Hot", 99)
        info = store.publish("Hot", new.blob)
        resp = rs.wait_for("a publish after the outage", lambda: (r := rs.predict(http, "Hot")).json()["version"] == info.version and r)
        assert rs.matches(resp, new)
    store.close()


def test_readiness_probe_can_leave_the_store_out(redis_srv):
    """/readyz?store=optional (the Kubernetes readiness probe) stays 200 through a Redis outage,
    so cached tasks keep their replicas in the Service; /readyz still says 503. Problems of the
    process itself fail both."""
    hot = rs.make_version("Hot", 21)
    url, embedded = _server(redis_srv)
    store = open_store(url)
    store.publish("Hot", hot.blob)
    with embedded as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        optional = http.get("/readyz", params={"store": "optional"})
        assert optional.status_code == 200 and optional.json()["store_problems"] == []
        assert http.get("/readyz", params={"store": "required"}).status_code == 200
        assert rs.matches(rs.predict(http, "Hot"), hot)  # now resident
        redis_srv.stop()
        down = rs.wait_for("readyz says the store is down", lambda: (
            r := http.get("/readyz")).status_code == 503 and r)
        assert "unreachable" in down.json()["detail"]
        optional = http.get("/readyz", params={"store": "optional"})
        assert optional.status_code == 200, optional.text
        assert optional.json()["status"] == "ready"
        assert any("unreachable" in p for p in optional.json()["store_problems"])
        assert rs.matches(rs.predict(http, "Hot"), hot)  # what the probe keeps in the Service
        bad = http.get("/readyz", params={"store": "sometimes"})
        assert bad.status_code == 422 and bad.json()["error"] and "store" in bad.json()["detail"]
        srv.runtime.begin_drain()  # what SIGTERM does first
        draining = http.get("/readyz", params={"store": "optional"})
        assert draining.status_code == 503 and "shutting down" in draining.json()["detail"]
        assert any("unreachable" in p for p in draining.json()["store_problems"])
    store.close()


def test_a_refused_number_is_not_refused_again_after_a_reset_gives_it_to_another_file(redis_srv):
    """Redis restarted empty numbers every task from 1 again: a refusal recorded for v1 before
    the restart says nothing about the different file that is v1 now."""
    keep, alien, good = rs.make_version("Keep", 31), rs.make_version("C", 32, base_fingerprint="0" * 64), rs.make_version("C", 33)
    url, embedded = _server(redis_srv)
    store = open_store(url)
    store.publish("Keep", keep.blob)
    assert store.publish("C", alien.blob).version == 1
    with embedded as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        refused = rs.wait_for("C v1 refused", lambda: next(
            (e for e in http.get("/tasks").json()["tasks"] if e["task"] == "C" and e["refused"]), None))
        assert refused["refused"]["reason"] == "base_mismatch"
        redis_srv.restart(empty=True)
        rs.wait_for("the empty store seen", lambda: http.get("/readyz").status_code == 503)
        assert store.publish("C", good.blob).version == 1  # the same number, another file
        resp = rs.wait_for("the new C v1 served", lambda: (r := rs.predict(http, "C")).status_code == 200 and r)
        assert rs.matches(resp, good)
    store.close()
