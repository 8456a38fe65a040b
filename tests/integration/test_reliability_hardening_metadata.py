"""Issue 24, item 6: whoever can publish cannot amplify.

A 15 MB `config` was re-read by every reconcile, 15 MB of class labels went into every answer,
a 100,000-class head made a 15 KB /v2 request answer 72 MB. The residual's metadata is bounded
(residual_store.residual.MAX_CLASSES, MAX_CLASS_NAME, MAX_METADATA_VALUE) at publish and import,
and at load for what a publisher wrote around the validation. On Redis the reconcile reads a
version's record only when the task's index changed, counted with INFO commandstats of a
private redis-server.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest
import reliability_support as rs

from residual_store import to_bytes
from residual_store.errors import ResidualFormatError
from residual_store.residual import MAX_CLASS_NAME, MAX_CLASSES, MAX_METADATA_VALUE, inspect_blob
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import random_residual

pytestmark = pytest.mark.integration


def _oversized(kind: str) -> bytes:
    classes = {"head_width": [f"c{i}" for i in range(MAX_CLASSES + 1)],
               "class_name": ["c0", "x" * (MAX_CLASS_NAME + 1)]}.get(kind, ["c0", "c1"])
    r = random_residual(rs.base(), "A", classes, base_model=rs.MODEL, seed=9)
    if kind == "config":
        r.metadata["config"] = json.dumps({"pad": "x" * MAX_METADATA_VALUE})
    return to_bytes(r)


KINDS = ["config", "class_name", "head_width"]


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_metadata_is_refused_at_publish(tmp_path, kind):
    with pytest.raises(ResidualFormatError, match="limit"):
        open_store(str(tmp_path / "store")).publish("A", _oversized(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_metadata_written_around_the_store_is_refused_at_load(tmp_path, kind):
    r = rs.shared_redis_or_skip()
    prefix = rs.unique_prefix()
    try:
        blob = _oversized(kind)
        good = rs.make_version("A", 1)
        url = f"{rs.SHARED_REDIS_URL}?prefix={prefix}"
        open_store(url).publish("A", good.blob)
        # the metadata of a valid residual, so the catalog switches and the load finds out
        rs.raw_publish(r, prefix, "A", blob, inspect_blob(good.blob), announced_sha=None)
        cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=url, port=0)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            resp = rs.predict(http, "A")
            assert resp.status_code == 503 and "limit" in resp.json()["detail"], resp.text
    finally:
        rs.delete_prefix(r, prefix)


def _calls(client) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_the_redis_reconcile_reads_only_what_changed(tmp_path):
    redis_srv = rs.PrivateRedis(tmp_path).start()
    client = redis_srv.client()
    try:
        store = open_store(redis_srv.url)
        tasks = ["A", "B", "C"]
        for seed in range(3):  # three versions of each task: a listing used to read all nine
            rs.publish_versions(redis_srv.url, tasks, first_seed=80 + 10 * seed)
        store.list_tasks()
        client.config_resetstat()
        assert [t.current.version for t in store.list_tasks()] == [3, 3, 3]
        calls = _calls(client)
        assert calls.get("hgetall", 0) == 0 and calls.get("hget", 0) == 3, calls  # the currents
        rs.publish_versions(redis_srv.url, ["B"], first_seed=99)
        client.config_resetstat()
        assert [t.current.version for t in store.list_tasks()] == [3, 4, 3]
        calls = _calls(client)
        assert calls.get("hget", 0) == 3 + 1, calls  # and B's new record, only

        cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=redis_srv.url, port=0,
                          reconcile_interval=0.1)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert rs.predict(http, "A").status_code == 200
            time.sleep(0.3)
            client.config_resetstat()
            time.sleep(1.0)  # about ten reconciles of an unchanged store
            calls = _calls(client)
            assert calls.get("hgetall", 0) == 0, calls
            assert calls.get("hget", 0) <= 3 * 12, calls  # the currents, nothing parsed
    finally:
        client.close()
        redis_srv.stop()
