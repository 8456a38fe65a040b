"""Hot reload through the directory store and through Redis: publish, rollback, a refused
residual of another base, delete, and a store that goes away while tasks keep serving."""
from __future__ import annotations

import io
import time

import httpx
import pytest
import torch
from PIL import Image

from residual_store import BaseSpec, to_bytes
from residual_store.preprocess import eval_transform
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer, free_port
from server.synthetic import image_bytes, random_residual, reference_scores

pytestmark = pytest.mark.integration

IMAGE = image_bytes(5)
CLASSES = ["p", "q", "r", "s"]


@pytest.fixture(scope="module")
def base():
    return BaseSpec("uda-tiny-vit").build()


@pytest.fixture(scope="module")
def versions(base):
    """Three different residuals of task T (and their reference top-1 score vectors)."""
    x = eval_transform(32)(Image.open(io.BytesIO(IMAGE)).convert("RGB"))[None]
    out = []
    for seed in (21, 22, 23):
        r = random_residual(base, "T", CLASSES, base_model="uda-tiny-vit", seed=seed)
        out.append((to_bytes(r), reference_scores(base, r, x)[0]))
    return out


def predict(client: httpx.Client, task: str = "T") -> httpx.Response:
    return client.post(f"/predict?task={task}&top_k=4", content=IMAGE, headers={"content-type": "image/png"})


def scores(resp: httpx.Response) -> torch.Tensor:
    out = torch.zeros(len(CLASSES))
    for item in resp.json()["predictions"][0]["top_k"]:
        out[item["index"]] = item["score"]
    return out


def wait_for(check, timeout: float = 15.0):
    """Poll `check` until it returns a truthy value (generous timeout: a slow shared machine)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_publish_rollback_refusal_and_delete_reach_the_server(store_url, versions, base):
    store = open_store(store_url)
    store.publish("T", versions[0][0])
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=store_url, port=0, reconcile_interval=0.5)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        first = predict(client)
        assert first.json()["version"] == 1
        torch.testing.assert_close(scores(first), versions[0][1], rtol=0, atol=1e-5)

        store.publish("T", versions[1][0])  # resident task: staged, then switched
        resp = wait_for(lambda: (r := predict(client)).json()["version"] == 2 and r)
        assert resp, "publish of v2 never reached the server"
        torch.testing.assert_close(scores(resp), versions[1][1], rtol=0, atol=1e-5)

        store.rollback("T", 1)  # republishes v1's bytes as v3
        resp = wait_for(lambda: (r := predict(client)).json()["version"] == 3 and r)
        assert resp, "rollback never reached the server"
        torch.testing.assert_close(scores(resp), versions[0][1], rtol=0, atol=1e-5)

        other = random_residual(base, "T", CLASSES, base_model="uda-tiny-vit", seed=9,
                                base_fingerprint="0" * 64)
        store.publish("T", to_bytes(other))  # v4 belongs to another base: refused
        entry = wait_for(lambda: (e := client.get("/tasks").json()["tasks"][0])["refused"] and e)
        assert entry and entry["version"] == 3 and entry["refused"]["version"] == 4
        assert entry["refused"]["reason"] == "base_mismatch"
        resp = predict(client)
        assert resp.json()["version"] == 3  # the old version keeps serving
        torch.testing.assert_close(scores(resp), versions[0][1], rtol=0, atol=1e-5)
        assert 'uda_residuals_refused_total{reason="base_mismatch"} 1.0' in client.get("/metrics").text

        store.publish("T", versions[2][0])  # a good v5 after the refused v4
        resp = wait_for(lambda: (r := predict(client)).json()["version"] == 5 and r)
        torch.testing.assert_close(scores(resp), versions[2][1], rtol=0, atol=1e-5)
        assert client.get("/tasks").json()["tasks"][0]["refused"] is None

        store.publish("U", versions[0][0])  # a new task appears
        assert wait_for(lambda: predict(client, "U").status_code == 200)
        store.delete("U")
        assert wait_for(lambda: predict(client, "U").status_code == 404)
        fp = srv.runtime.engine.fingerprint_now()
        assert fp == srv.runtime.engine.fingerprint
    store.close()


def test_new_task_of_another_base_is_refused_not_served(tmp_path, base):
    store = open_store(str(tmp_path / "s"))
    good = random_residual(base, "Good", CLASSES, base_model="uda-tiny-vit", seed=1)
    alien = random_residual(base, "Alien", CLASSES, base_model="uda-tiny-vit", seed=2,
                            base_fingerprint="f" * 64)
    store.publish("Good", to_bytes(good))
    store.publish("Alien", to_bytes(alien))
    with EmbeddedServer(ServeConfig(model="uda-tiny-vit", pretrained="random",
                                    store=str(tmp_path / "s"), port=0)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        resp = predict(client, "Alien")
        assert resp.status_code == 503 and "refused" in resp.json()["detail"]
        assert predict(client, "Good").status_code == 200
        tasks = {t["task"]: t for t in client.get("/tasks").json()["tasks"]}
        assert tasks["Alien"]["servable"] is False and tasks["Good"]["servable"] is True
        assert 'reason="base_mismatch"' in client.get("/metrics").text


def test_readyz_is_not_ready_when_every_task_is_refused(tmp_path, base):
    """Every published task trained on another base: /readyz said 200 "ready" with 0 tasks (#23)."""
    store = open_store(str(tmp_path / "s"))
    for i, task in enumerate(("A1", "A2")):
        store.publish(task, to_bytes(random_residual(base, task, CLASSES, base_model="uda-tiny-vit", seed=i,
                                                     base_fingerprint="f" * 64)))
    with EmbeddedServer(ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(tmp_path / "s"),
                                    port=0, reconcile_interval=0.2)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        for probe in ("/readyz", "/readyz?store=optional"):
            resp = wait_for(lambda: (r := client.get(probe)).status_code == 503 and r)
            assert resp, client.get(probe).text
            detail = resp.json()["detail"]
            assert "none of the 2 published task(s) can be served" in detail
            assert "A1 v1 (base_mismatch)" in detail and "A2 v1 (base_mismatch)" in detail
        # one servable task is enough to be ready again
        store.publish("Good", to_bytes(random_residual(base, "Good", CLASSES, base_model="uda-tiny-vit", seed=9)))
        assert wait_for(lambda: client.get("/readyz").status_code == 200), client.get("/readyz").text
    store.close()


def test_cached_tasks_keep_serving_while_the_store_is_gone(tmp_path, versions):
    root = tmp_path / "store"
    store = open_store(str(root))
    store.publish("T", versions[0][0])
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(root), port=0, reconcile_interval=0.2)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert predict(client).status_code == 200  # now resident
        root.rename(tmp_path / "moved")  # the volume vanishes
        ready = wait_for(lambda: (r := client.get("/readyz")).status_code == 503 and r)
        assert ready and "unreachable" in ready.json()["detail"]
        resp = predict(client)
        assert resp.status_code == 200 and resp.json()["version"] == 1
        (tmp_path / "moved").rename(root)
        assert wait_for(lambda: client.get("/readyz").status_code == 200)


def test_unreachable_redis_makes_readyz_say_why():
    url = f"redis://127.0.0.1:{free_port()}/0?prefix=uda-test-none:"
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=url, port=0)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        resp = client.get("/readyz")
        assert resp.status_code == 503
        assert "unreachable" in resp.json()["detail"]
        assert client.get("/healthz").status_code == 200
        assert predict(client).status_code == 404  # nothing known, nothing served


def test_a_batch_in_flight_finishes_on_the_old_version(tmp_path, versions):
    import concurrent.futures

    root = str(tmp_path / "store")
    store = open_store(root)
    store.publish("T", versions[0][0])
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=root, port=0, reconcile_interval=0.2)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert predict(client).json()["version"] == 1
        registry = srv.runtime.metrics.registry
        hits = registry.get_sample_value("uda_residual_cache_hits_total")
        lock = srv.runtime.engine._lock
        lock.acquire()  # the next batch stops right before its swap
        held = True
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(predict, client)
                # the model thread counts the hit after picking the batch, then waits on the lock
                assert wait_for(lambda: registry.get_sample_value("uda_residual_cache_hits_total") > hits)
                store.publish("T", versions[1][0])
                assert wait_for(lambda: srv.runtime.catalog.get("T").version == 2)
                lock.release()
                held = False
                old = in_flight.result(30)
        finally:
            if held:
                lock.release()
        assert old.json()["version"] == 1
        torch.testing.assert_close(scores(old), versions[0][1], rtol=0, atol=1e-5)
        new = predict(client)
        assert new.json()["version"] == 2
        torch.testing.assert_close(scores(new), versions[1][1], rtol=0, atol=1e-5)
