"""Issue 24, item 3: a directory store that is empty for a moment unpublishes nothing.

`mv store/tasks store/tasks.x; mkdir store/tasks` (or a volume unmounted for a moment) looks,
to a poller, like every task deleted at once. It is the store-reset case Redis already had:
resident tasks keep serving from the cache, /readyz reports the store problem, refusals are
kept, and everything is as before once the folder is back.
"""
from __future__ import annotations

import time

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration


def test_a_store_folder_that_vanishes_for_a_moment_unpublishes_nothing(tmp_path):
    root = tmp_path / "store"
    versions = rs.publish_versions(str(root), ["A", "B"], first_seed=41)
    alien = rs.make_version("C", 43, base_fingerprint="0" * 64)  # refused: another base
    open_store(str(root)).publish("C", alien.blob)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0,
                      preload=("A", "B"), reconcile_interval=0.1)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.wait_for("C refused", lambda: any(
            t["task"] == "C" and t["refused"] for t in http.get("/tasks").json()["tasks"]), 30)
        assert http.get("/readyz").status_code == 200

        (root / "tasks").rename(root / "tasks.x")
        (root / "tasks").mkdir()
        # /readyz says what is wrong (on today's code it said ready, with 0 tasks)
        resp = rs.wait_for("/readyz to report the store problem",
                           lambda: (r := http.get("/readyz")).status_code == 503 and r, 15)
        assert "A" in " ".join(resp.json()["store_problems"]), resp.text
        deadline = time.monotonic() + 1.5  # more than 7 poll rounds and 15 reconciles
        while time.monotonic() < deadline:
            for task, v in versions.items():
                answer = rs.predict(http, task)
                assert answer.status_code == 200 and rs.matches(answer, v), (task, answer.text)
            time.sleep(0.1)
        refused = {t["task"]: t["refused"] for t in http.get("/tasks").json()["tasks"]}
        assert refused.get("C") and refused["C"]["reason"] == "base_mismatch", refused

        (root / "tasks").rmdir()
        (root / "tasks.x").rename(root / "tasks")
        rs.wait_for("ready again", lambda: http.get("/readyz").status_code == 200, 15)
        assert {t for t in http.get("/tasks").json()["tasks"] for t in [t["task"]]} >= {"A", "B", "C"}
        assert all(rs.predict(http, t).status_code == 200 for t in versions)


def test_a_real_delete_of_the_last_task_still_unpublishes_it(tmp_path):
    root = tmp_path / "store"
    rs.publish_versions(str(root), ["A"], first_seed=44)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0,
                      preload=("A",), reconcile_interval=0.1)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").status_code == 200
        open_store(str(root)).delete("A")
        rs.wait_for("A unpublished", lambda: rs.predict(http, "A").status_code == 404, 15)
        assert rs.wait_for("ready with no tasks", lambda: http.get("/readyz").status_code == 200, 15)
