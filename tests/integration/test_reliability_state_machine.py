"""Issue 6, point 3: the restore invariant as a hypothesis state machine against a live server.

Steps: predict / publish / evict (admin unload) / rollback / store flush (FLUSHALL of a private
redis-server: the store loses everything). After every step the base weights' fingerprint
equals the one the server started with; every 200 equals the reference of a version published
under that number; nothing answers 5xx except a 503 for a task the store lost while it was
not resident.
"""
from __future__ import annotations

import httpx
import pytest
import reliability_support as rs
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from residual_store.errors import UnknownTask
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

TASKS = ("A", "B")
SEEDS = range(3)


class ServerMachine(RuleBasedStateMachine):
    ctx: dict = {}  # set by the test: server, store, redis client, version pool

    def __init__(self):
        super().__init__()
        self.ctx["redis"].flushall()
        # (task, version number) -> every Version ever published under it. Flushes renumber,
        # and the server outlives each example (it keeps serving what the store lost), so the
        # history is kept across examples too.
        self.history: dict[tuple[str, int], list[rs.Version]] = self.ctx["history"]

    @property
    def http(self) -> httpx.Client:
        return self.ctx["http"]

    @rule(task=st.sampled_from(TASKS), seed=st.sampled_from(SEEDS))
    def publish(self, task, seed):
        v = self.ctx["pool"][task, seed]
        info = self.ctx["store"].publish(task, v.blob)
        self.history.setdefault((task, info.version), []).append(v)

    @rule(task=st.sampled_from(TASKS), pick=st.integers(0, 10))
    def rollback(self, task, pick):
        store = self.ctx["store"]
        try:
            kept = store.versions(task)
        except UnknownTask:
            return
        old = kept[pick % len(kept)].version
        info = store.rollback(task, old)
        self.history.setdefault((task, info.version), []).extend(self.history.get((task, old), []))

    @rule(task=st.sampled_from(TASKS))
    def evict(self, task):
        resp = self.http.post(f"/admin/tasks/{task}/unload", headers=rs.admin())
        assert resp.status_code in (200, 404), resp.text

    @rule()
    def flush(self):
        self.ctx["redis"].flushall()

    @rule(task=st.sampled_from(TASKS), image=st.integers(0, len(rs.IMAGES) - 1))
    def predict(self, task, image):
        resp = rs.predict(self.http, task, image)
        assert resp.status_code in (200, 404, 503), resp.text
        if resp.status_code == 200:
            candidates = self.history.get((task, resp.json()["version"]), [])
            assert any(rs.matches(resp, v, image) for v in candidates), resp.json()

    @invariant()
    def base_weights_are_restored(self):
        fp = self.http.get("/admin/fingerprint", headers=rs.admin()).json()
        assert fp["unchanged"] is True and fp["fingerprint"] == self.ctx["fingerprint"]


def test_restore_invariant_state_machine(tmp_path):
    redis_srv = rs.PrivateRedis(tmp_path).start()
    url = f"{redis_srv.url}?prefix=uda-sm:"
    store = open_store(url)
    pool = {(t, s): rs.make_version(t, 300 + 10 * i + s) for i, t in enumerate(TASKS) for s in SEEDS}
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=url, port=0, admin_token=rs.ADMIN_TOKEN,
                      reconcile_interval=0.1,
                      cache_bytes=rs.cache_budget(1.5, *pool.values()))  # one resident residual
    try:
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            ServerMachine.ctx = {"http": http, "store": store, "redis": redis_srv.client(),
                                 "pool": pool, "fingerprint": srv.runtime.engine.fingerprint, "history": {}}
            run_state_machine_as_test(ServerMachine, settings=settings(
                max_examples=8, stateful_step_count=12, deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate),  # the server's state makes replays differ
                suppress_health_check=list(HealthCheck)))
            assert srv.runtime.engine.fingerprint_now() == srv.runtime.engine.fingerprint
    finally:
        ServerMachine.ctx = {}
        store.close()
        redis_srv.stop()
