"""uda-serve over real HTTP (uvicorn on loopback, directory store): answers equal the offline
reference, every bad input gets its status and JSON error, admin auth, metrics labels."""
from __future__ import annotations

import base64
import concurrent.futures
import io

import httpx
import pytest
import torch
from PIL import Image

from residual_store import BaseSpec, to_bytes
from residual_store.preprocess import eval_transform
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import image_bytes, random_residual, reference_scores

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
TASKS = {"Ar2Cl": ["cat", "dog", "cow"], "Cl2Pr": ["a", "b", "c", "d", "e"], "photo.v2": ["x", "y"]}


@pytest.fixture(scope="module")
def base():
    return BaseSpec("uda-tiny-vit").build()


@pytest.fixture(scope="module")
def residuals(base):
    return {t: random_residual(base, t, c, base_model="uda-tiny-vit", seed=i + 11)
            for i, (t, c) in enumerate(TASKS.items())}


@pytest.fixture(scope="module")
def server(tmp_path_factory, residuals):
    root = tmp_path_factory.mktemp("store")
    store = open_store(str(root))
    for task, r in residuals.items():
        store.publish(task, to_bytes(r))
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(root), port=0, admin_token=TOKEN,
                      max_batch=8, max_image_bytes=100_000, max_image_pixels=500_000)
    with EmbeddedServer(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


IMAGES = [image_bytes(s, fmt=f) for s, f in ((1, "PNG"), (2, "JPEG"), (3, "WEBP"), (4, "PNG"))]


def reference(base, residual, blobs):
    t = eval_transform(32)
    x = torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    return reference_scores(base, residual, x)


def assert_matches(predictions, expected, classes):
    assert len(predictions) == expected.shape[0]
    for pred, row in zip(predictions, expected):
        top = pred["top_k"]
        assert top[0]["index"] == int(row.argmax())
        assert top[0]["label"] == classes[top[0]["index"]]
        for item in top:
            assert abs(item["score"] - float(row[item["index"]])) <= 1e-5


def test_multipart_predictions_equal_the_reference(client, base, residuals):
    for task, r in residuals.items():
        files = [("file", (f"img{i}", b, "application/octet-stream")) for i, b in enumerate(IMAGES)]
        resp = client.post("/predict", params={"task": task, "top_k": 3}, files=files)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["task"] == task and body["version"] == 1
        assert set(body["timing"]) == {"queue_ms", "swap_ms", "model_ms"}
        assert all(len(p["top_k"]) == min(3, len(TASKS[task])) for p in body["predictions"])
        assert_matches(body["predictions"], reference(base, r, IMAGES), TASKS[task])


def test_raw_body_and_v2_infer(client, base, residuals):
    r = residuals["Cl2Pr"]
    resp = client.post("/predict?task=Cl2Pr&top_k=5", content=IMAGES[1], headers={"content-type": "image/jpeg"})
    assert resp.status_code == 200
    assert_matches(resp.json()["predictions"], reference(base, r, IMAGES[1:2]), TASKS["Cl2Pr"])

    body = {"id": "req-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                       "data": [base64.b64encode(b).decode() for b in IMAGES[:2]]}]}
    resp = client.post("/v2/models/Cl2Pr/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"] == "req-1" and out["model_name"] == "Cl2Pr" and out["model_version"] == "1"
    outputs = {o["name"]: o for o in out["outputs"]}
    expected = reference(base, r, IMAGES[:2])
    assert outputs["class_index"]["data"] == expected.argmax(1).tolist()
    assert outputs["scores"]["shape"] == [2, 5]
    torch.testing.assert_close(torch.tensor(outputs["scores"]["data"]).reshape(2, 5), expected,
                               rtol=0, atol=1e-5)


def test_v2_metadata_and_health(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/Ar2Cl").json()
    assert meta["name"] == "Ar2Cl" and meta["versions"] == ["1"]
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert client.get("/v2/models/Ar2Cl/ready").json()["ready"] is True
    assert client.get("/v2/models/nope/ready").status_code == 404


def test_tasks_health_and_ready(client, server):
    tasks = {t["task"]: t for t in client.get("/tasks").json()["tasks"]}
    assert set(tasks) == set(TASKS)
    assert tasks["Ar2Cl"]["classes"] == TASKS["Ar2Cl"] and tasks["Ar2Cl"]["version"] == 1
    assert tasks["Ar2Cl"]["dsp"] > 0 and tasks["Ar2Cl"]["pinned"] is False
    health = client.get("/healthz").json()
    assert health["status"] == "alive" and health["fingerprint"] == server.runtime.engine.fingerprint
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["tasks"] == 3


def test_concurrent_clients_get_their_tasks_answers(client, base, residuals, server):
    expected = {t: reference(base, r, IMAGES) for t, r in residuals.items()}
    jobs = [(t, i % len(IMAGES)) for i, t in enumerate(list(TASKS) * 20)]

    def call(job):
        task, i = job
        with httpx.Client(base_url=server.url, timeout=60) as c:
            resp = c.post("/predict", params={"task": task, "top_k": 1},
                          files={"file": ("x", IMAGES[i], "image/png")})
        return task, i, resp

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for task, i, resp in pool.map(call, jobs):
            assert resp.status_code == 200, resp.text
            top = resp.json()["predictions"][0]["top_k"][0]
            row = expected[task][i]
            assert top["index"] == int(row.argmax())
            assert abs(top["score"] - float(row.max())) <= 1e-5
    fp = client.get("/admin/fingerprint", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert fp["unchanged"] and fp["fingerprint"] == fp["expected"]
    assert fp["swaps"] >= 2


PNG = {"headers": {"content-type": "image/png"}}


@pytest.mark.parametrize("params,kwargs,status,error", [
    ({"task": "nope"}, {"content": IMAGES[0], **PNG}, 404, "unknown task"),
    ({"task": "bad name!"}, {"content": IMAGES[0], **PNG}, 422, "invalid request"),  # the schema has the name rule
    ({}, {"content": IMAGES[0], **PNG}, 422, "invalid request"),
    ({"task": "Ar2Cl", "top_k": 0}, {"content": IMAGES[0], **PNG}, 422, "invalid request"),
    ({"task": "Ar2Cl"}, {"content": b"plain text", "headers": {"content-type": "text/plain"}}, 415, None),
    ({"task": "Ar2Cl"}, {"content": b"not really a png", "headers": {"content-type": "image/png"}}, 415, None),
    ({"task": "Ar2Cl"}, {"content": image_bytes(0, fmt="GIF"), "headers": {"content-type": "image/gif"}}, 415, None),
    ({"task": "Ar2Cl"}, {"content": IMAGES[0][:100], "headers": {"content-type": "image/png"}}, 400, "corrupt image"),
    ({"task": "Ar2Cl"}, {"content": b"", "headers": {"content-type": "image/png"}}, 400, None),
    ({"task": "Ar2Cl"}, {"content": b"\x89PNG" + b"0" * 100_001, "headers": {"content-type": "image/png"}}, 413, None),
    ({"task": "Ar2Cl"}, {"files": [("file", ("x", IMAGES[0], "image/png"))] * 9}, 413, None),
    ({"task": "Ar2Cl"}, {"files": [("other", ("x", IMAGES[0], "image/png"))]}, 400, None),
])
def test_bad_inputs(client, params, kwargs, status, error):
    resp = client.post("/predict", params=params, **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    if error:
        assert body["error"] == error


def test_decompression_bomb_is_413(client):
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, "PNG")  # 4 M pixels > 500 k, a few KB on the wire
    resp = client.post("/predict?task=Ar2Cl", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert resp.status_code == 413 and "pixels" in resp.json()["detail"]


def test_bad_v2_bodies(client):
    for body, status in ((b"{not json", 400), (b'{"inputs": []}', 400),
                         (b'{"inputs": [{"name": "image", "datatype": "BYTES", "data": ["***"]}]}', 400)):
        resp = client.post("/v2/models/Ar2Cl/infer", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == status and set(resp.json()) == {"error", "detail"}


@pytest.mark.parametrize("body", [
    b"[" * 100_000,  # nested deeper than the JSON parser recurses
    b'{"inputs": [{"name": "image", "datatype": "BYTES", "data": ["a"]}], "id": ' + b"7" * 5000 + b"}",
], ids=["deep_nesting", "huge_integer"])
def test_v2_bodies_python_cannot_parse_are_400(client, body):
    resp = client.post("/v2/models/Ar2Cl/infer", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad request" and "not JSON" in resp.json()["detail"]


def test_admin_auth(client):
    assert client.post("/admin/reload").status_code == 401
    resp = client.post("/admin/reload", headers={"authorization": "Bearer wrong-token"})
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
    ok = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["tasks"] == {t: 1 for t in TASKS}
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert client.post("/admin/tasks/photo.v2/unload", headers=auth).json()["resident"] is False
    assert client.post("/admin/tasks/photo.v2/load", headers=auth).json()["resident"] is True
    assert client.post("/admin/tasks/nope/load", headers=auth).status_code == 404


def test_docs_page_loads_its_assets_from_the_server_and_openapi_is_served(client):
    # On by default since issue 20, with Swagger UI from a wheel: no URL of another host.
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "://" not in page.text
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_metrics_have_published_task_labels_only(client):
    client.post("/predict?task=Ar2Cl", content=IMAGES[0], headers={"content-type": "image/png"})
    client.post("/predict?task=ghost-task", content=IMAGES[0], headers={"content-type": "image/png"})
    client.get("/v2/models/ghost-task-2")
    text = client.get("/metrics").text
    for name in ("uda_request_duration_seconds_bucket", "uda_requests_total", "uda_batch_size_bucket",
                 "uda_swap_duration_seconds_bucket", "uda_residual_load_duration_seconds_bucket",
                 "uda_residual_cache_hits_total", "uda_residual_cache_misses_total",
                 "uda_residual_cache_evictions_total", "uda_residual_cache_bytes",
                 "uda_residual_cache_entries", "uda_task_resident", "uda_queue_depth",
                 "uda_tasks_published", "uda_residuals_refused_total"):
        assert name in text, name
    assert 'uda_requests_total{code="200",task="Ar2Cl"}' in text
    assert 'uda_task_resident{task="Ar2Cl"} 1.0' in text
    assert "uda_tasks_published 3.0" in text
    assert "uda_store_up 1.0" in text
    assert "uda_queue_capacity " in text
    assert 'uda_residuals_refused_total{reason="base_mismatch"}' in text
    assert "ghost" not in text
