"""Limits over real HTTP: eviction and reload under a tiny --cache-bytes, pinning, 429 on a full
queue, 503 on a request timeout, and a cold task served while a hot one floods."""
from __future__ import annotations

import concurrent.futures
import io
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from residual_store import BaseSpec, to_bytes
from residual_store.flat import ParamLayout
from residual_store.preprocess import eval_transform
from residual_store.stores import open_store
from server.cache import cached_nbytes, resident_form
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import image_bytes, random_residual, reference_scores

pytestmark = pytest.mark.integration

IMAGE = image_bytes(8)
TASKS = ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def base():
    return BaseSpec("uda-tiny-vit").build()


@pytest.fixture(scope="module")
def published(tmp_path_factory, base):
    """A directory store with four tasks, and each task's reference scores for IMAGE."""
    root = tmp_path_factory.mktemp("store")
    store = open_store(str(root))
    x = eval_transform(32)(Image.open(io.BytesIO(IMAGE)).convert("RGB"))[None]
    expected, largest = {}, 0
    layout = ParamLayout.of(base.visual)
    for i, task in enumerate(TASKS):
        r = random_residual(base, task, ["c0", "c1", "c2"], base_model="uda-tiny-vit", seed=40 + i)
        store.publish(task, to_bytes(r))
        expected[task] = reference_scores(base, r, x)[0]
        largest = max(largest, cached_nbytes(resident_form(r, layout), r.build_head()))
    return str(root), expected, largest


def predict(client, task):
    return client.post(f"/predict?task={task}&top_k=3", content=IMAGE, headers={"content-type": "image/png"})


def check(resp, expected):
    assert resp.status_code == 200, resp.text
    got = torch.zeros(3)
    for item in resp.json()["predictions"][0]["top_k"]:
        got[item["index"]] = item["score"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def entry_bytes(srv) -> int:
    return max(e.nbytes for e in (srv.runtime.cache.peek(k) for k in srv.runtime.cache.keys()))


def test_eviction_and_reload_under_a_tiny_cache(published):
    root, expected, largest = published
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random",
                      store=root, port=0, cache_bytes=int(1.5 * largest))  # one fits
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        for task in TASKS * 3:
            check(predict(client, task), expected[task])
            resident = [t["task"] for t in client.get("/tasks").json()["tasks"] if t["resident"]]
            assert resident == [task]
        text = client.get("/metrics").text
        assert "uda_residual_cache_evictions_total 11.0" in text
        assert "uda_residual_cache_misses_total 12.0" in text
        assert "uda_residual_cache_entries 1.0" in text
        assert srv.runtime.engine.fingerprint_now() == srv.runtime.engine.fingerprint


def test_pinned_task_stays_resident(published):
    root, expected, largest = published
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random",
                      store=root, port=0, cache_bytes=int(2.5 * largest), pin=("A",),
                      admin_token="pin-test-token")
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        tasks = {t["task"]: t for t in client.get("/tasks").json()["tasks"]}
        assert tasks["A"]["resident"] and tasks["A"]["pinned"]  # loaded at start
        for task in ["B", "C", "D", "B", "C"]:
            check(predict(client, task), expected[task])
            tasks = {t["task"]: t for t in client.get("/tasks").json()["tasks"]}
            assert tasks["A"]["resident"] and tasks[task]["resident"]
            assert sum(t["resident"] for t in tasks.values()) == 2
        resp = client.post("/admin/tasks/A/unload", headers={"authorization": "Bearer pin-test-token"})
        assert resp.status_code == 409 and resp.json()["error"] == "conflict"
        check(predict(client, "A"), expected["A"])


def _fire(url: str, task: str, n: int) -> list[httpx.Response]:
    def one(_):
        with httpx.Client(base_url=url, timeout=60) as c:
            return predict(c, task)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _wait_until(check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_full_queue_answers_429_with_retry_after(published):
    root, expected, _ = published
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=root, port=0, max_queue=3, max_batch=1)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        check(predict(client, "A"), expected["A"])
        engine = srv.runtime.engine
        engine._lock.acquire()  # a forward pass that takes a while: the model thread waits here
        try:
            pool = concurrent.futures.ThreadPoolExecutor(1)
            pending = pool.submit(_fire, srv.url, "A", 8)
            # 1 request waits in the model thread (usually), 3 fill the queue, the rest are refused
            _wait_until(lambda: srv.runtime.batcher.depth == 3 and (srv.runtime.metrics.registry.get_sample_value(
                "uda_requests_total", {"task": "A", "code": "429"}) or 0) >= 4)
        finally:
            engine._lock.release()
        responses = pending.result(60)
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429} and codes.count(429) in (4, 5)
        refused = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"] == "overloaded" for r in refused)
        for r in responses:
            if r.status_code == 200:
                check(r, expected["A"])


def test_request_timeout_answers_503(published):
    root, _, _ = published
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=root, port=0, request_timeout=0.5)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert predict(client, "B").status_code == 200
        srv.runtime.engine._lock.acquire()
        try:
            resp = predict(client, "B")
        finally:
            srv.runtime.engine._lock.release()
        assert resp.status_code == 503 and resp.json()["error"] == "timeout"
        assert "retry-after" in resp.headers
        assert predict(client, "B").status_code == 200


def test_cold_task_is_served_while_a_hot_task_floods(published):
    root, expected, _ = published
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=root, port=0, max_wait_ms=20, max_batch=4)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        check(predict(client, "D"), expected["D"])  # both resident before the flood
        check(predict(client, "C"), expected["C"])
        stop = threading.Event()
        hot_done = []

        def flood():
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not stop.is_set():
                    hot_done.append(predict(c, "C").status_code)

        threads = [threading.Thread(target=flood) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            _wait_until(lambda: len(hot_done) >= 20)
            cold = predict(client, "D")
            during = len(hot_done)
            _wait_until(lambda: len(hot_done) >= during + 5)  # the flood was still going on
        finally:
            stop.set()
            for t in threads:
                t.join()
        check(cold, expected["D"])
        assert set(hot_done) == {200}
        assert srv.runtime.engine.fingerprint_now() == srv.runtime.engine.fingerprint
