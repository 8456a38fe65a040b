"""Issue 6, point 10: backpressure and timeouts.

Load beyond the queue bound gets 429 (with Retry-After) at once, while the model is still busy,
never a 500; the queue never holds more than its bound; requests that wait too long get 503; a
client that stalls mid-upload gets 408 after --request-timeout and its connection is closed,
while other clients are served meanwhile.
"""
from __future__ import annotations

import concurrent.futures
import socket
import threading

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

MAX_QUEUE = 3


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    v1 = rs.make_version("A", 1)
    open_store(str(root)).publish("A", v1.blob)
    return str(root), v1


def test_overload_is_refused_fast_and_the_queue_stays_bounded(store_root):
    root, v1 = store_root
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=root, port=0, max_queue=MAX_QUEUE, max_batch=1,
                      request_timeout=60)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").status_code == 200
        depths, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                depths.append(srv.runtime.batcher.depth)
                depths.append(int(rs.metric(srv, "uda_queue_depth") or 0))

        sampler = threading.Thread(target=sample)
        sampler.start()

        def one(i):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                return rs.predict(c, "A", i % len(rs.IMAGES))

        lock = srv.runtime.engine._lock
        lock.acquire()  # the model is "busy": nothing leaves the queue
        try:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(one, i) for i in range(24)]
                # Refusals arrive while the model is still blocked: they never waited for it.
                refused = rs.wait_for("429s while the model is busy", lambda: sum(
                    f.done() and f.result().status_code == 429 for f in futures) >= 24 - MAX_QUEUE - 1)
                assert refused and not lock.acquire(blocking=False)
                lock.release()
                lock = None
                responses = [f.result() for f in futures]
        finally:
            if lock is not None:
                lock.release()
            stop.set()
            sampler.join()
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 500 not in codes, codes
        assert codes.count(200) in (MAX_QUEUE, MAX_QUEUE + 1)  # the queue + the one in the model
        for i, r in enumerate(responses):
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"] == "overloaded"
            else:
                assert rs.matches(r, v1, i % len(rs.IMAGES))
        assert max(depths) <= MAX_QUEUE
        assert rs.metric(srv, "uda_queue_capacity") == MAX_QUEUE


def test_a_request_that_waits_too_long_gets_503(store_root):
    root, v1 = store_root
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=root, port=0, request_timeout=1)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").status_code == 200
        with srv.runtime.engine._lock:
            resp = rs.predict(http, "A")
        assert resp.status_code == 503 and resp.json()["error"] == "timeout" and resp.headers["retry-after"]
        resp = rs.predict(http, "A")
        assert resp.status_code == 200 and rs.matches(resp, v1)
        assert srv.runtime.batcher.depth == 0


def test_a_stalled_upload_times_out_and_frees_its_connection(store_root):
    root, v1 = store_root
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=root, port=0, request_timeout=1.5, max_queue=1)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        host, port = srv.url.removeprefix("http://").split(":")
        stalled = []
        for _ in range(3):  # a few slow clients at once: they hold no queue slot meanwhile
            s = socket.create_connection((host, int(port)), timeout=60)
            s.sendall(b"POST /predict?task=A HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 5000\r\n\r\n" + rs.IMAGES[0][:100])
            stalled.append(s)
        for i in range(3):
            resp = rs.predict(http, "A", i)  # max_queue=1: only possible if no slot is held
            assert resp.status_code == 200 and rs.matches(resp, v1, i)
        for s in stalled:
            answer = b""
            while True:  # the server answers and then closes: recv returns b""
                part = s.recv(65536)
                if not part:
                    break
                answer += part
            s.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"request-timeout" in answer
        assert srv.runtime.batcher.depth == 0
        resp = rs.predict(http, "A")
        assert resp.status_code == 200
