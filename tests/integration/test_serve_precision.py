"""uda-serve --precision bf16 (issue 22) on a real uvicorn: bf16 answers, exact swaps, the guard.

Three tasks in a directory store: `Kept` (bf16 recorded 0.3 points below fp32), `Lossy` (1.5
points below) and `Unrecorded` (no record: a file from an older uda-train). A bf16 server with
the default --max-precision-drop 0.5 serves Kept from bf16 weights and refuses the other two
with the reason; /tasks, /healthz and the metrics name the precision; after many swaps the
bf16 weights are bit-identical. With --max-precision-drop inf it serves all three.
"""
from __future__ import annotations

import json
import math

import httpx
import pytest
import reliability_support as rs
import torch

from residual_store import to_bytes
from residual_store.precision import ACCURACY_KEY
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import random_residual, reference_scores

pytestmark = pytest.mark.integration

RECORDS = {"Kept": {"fp32": 0.800, "bf16": 0.797}, "Lossy": {"fp32": 0.800, "bf16": 0.785},
           "Unrecorded": None}
CLASSES = ["c0", "c1", "c2"]


def publish_all(url: str) -> dict[str, object]:
    store, residuals = open_store(url), {}
    for seed, (task, record) in enumerate(RECORDS.items()):
        r = random_residual(rs.base(), task, CLASSES, base_model=rs.MODEL, seed=seed + 21)
        if record is not None:
            r.metadata["metrics"] = json.dumps({"target_accuracy": record["fp32"], ACCURACY_KEY: record})
        store.publish(task, to_bytes(r))
        residuals[task] = r
    store.close()
    return residuals


def scores(resp: httpx.Response) -> torch.Tensor:
    return rs.scores_of(resp, len(CLASSES))


def serve(tmp_path, **settings) -> EmbeddedServer:
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(tmp_path / "store"), port=0,
                      precision="bf16", admin_token=rs.ADMIN_TOKEN, **settings)
    return EmbeddedServer(cfg)


def test_bf16_serves_the_kept_task_exactly_and_refuses_the_others(tmp_path):
    residuals = publish_all(str(tmp_path / "store"))
    images = rs.tensors(rs.IMAGES)
    with serve(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/healthz").json()["precision"] == "bf16"
        expected = reference_scores(rs.base(), residuals["Kept"], images, torch.bfloat16)
        fp32 = reference_scores(rs.base(), residuals["Kept"], images)
        first = []
        for image in range(len(rs.IMAGES)):
            resp = rs.predict(http, "Kept", image)
            assert resp.status_code == 200, resp.text
            torch.testing.assert_close(scores(resp), expected[image], rtol=0, atol=1e-6)
            first.append(resp.json()["predictions"])
        assert not torch.equal(expected, fp32)  # the bf16 answer is its own, not fp32's

        for task in ("Lossy", "Unrecorded"):
            resp = rs.predict(http, task)
            assert resp.status_code == 503, resp.text
            assert f"{task!r} v1 was refused (precision)" in resp.json()["detail"]
        detail = rs.predict(http, "Lossy").json()["detail"]
        assert "1.50 points below" in detail and "--precision fp32" in detail
        assert "no bf16 accuracy is recorded" in rs.predict(http, "Unrecorded").json()["detail"]

        entries = {e["task"]: e for e in http.get("/tasks").json()["tasks"]}
        assert entries["Kept"]["precision"] == "bf16" and entries["Kept"]["refused"] is None
        assert entries["Lossy"]["refused"]["reason"] == "precision"
        assert entries["Unrecorded"]["refused"]["reason"] == "precision"
        assert rs.metric(srv, "uda_task_precision", {"task": "Kept", "precision": "bf16"}) == 1
        assert rs.metric(srv, "uda_task_precision", {"task": "Lossy", "precision": "bf16"}) is None
        assert rs.metric(srv, "uda_residuals_refused_total", {"reason": "precision"}) == 2

        fp = http.get("/admin/fingerprint", headers=rs.admin()).json()
        assert fp["unchanged"] is True and fp["expected"] == srv.runtime.engine.resident_fingerprint
        again = [rs.predict(http, "Kept", image).json()["predictions"] for image in range(len(rs.IMAGES))]
        assert again == first


def test_max_precision_drop_inf_serves_every_task_in_bf16(tmp_path):
    residuals = publish_all(str(tmp_path / "store"))
    images = rs.tensors(rs.IMAGES)
    with serve(tmp_path, max_precision_drop=math.inf) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        for _ in range(2):  # swaps between the three tasks, twice
            for task, r in residuals.items():
                resp = rs.predict(http, task, 1)
                assert resp.status_code == 200, resp.text
                expected = reference_scores(rs.base(), r, images[1:2], torch.bfloat16)[0]
                torch.testing.assert_close(scores(resp), expected, rtol=0, atol=1e-6)
        assert http.get("/admin/fingerprint", headers=rs.admin()).json()["unchanged"] is True
        assert srv.runtime.workers[0].swaps >= 5
