"""A client that hangs up costs no batch and no 500.

Clients time out and close their connections (a load balancer's deadline, a killed process);
their queued requests must be dropped, not computed for nobody, and the hang-up is counted as
499 (nginx's "client closed request") instead of a 5xx that would page an operator.
"""
from __future__ import annotations

import logging
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration


def _raw_predict(url: str, task: str, body: bytes, declared: int | None = None,
                 pipelined: int = 1) -> socket.socket:
    """A socket that sent `pipelined` POST /predict requests with `body` (of `declared` bytes
    per its header) and reads nothing: the caller closes it to hang up."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (f"POST /predict?task={task} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {declared or len(body)}\r\n\r\n")
    sock.sendall((head.encode() + body) * pipelined)
    return sock


@pytest.fixture
def served(tmp_path):
    v1 = rs.make_version("A", 1)
    open_store(str(tmp_path / "store")).publish("A", v1.blob)
    srv = EmbeddedServer(ServeConfig(model=rs.MODEL, pretrained="random", store=str(tmp_path / "store"), port=0,
                                     max_batch=1)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert rs.matches(rs.predict(http, "A"), v1)  # resident: nothing left to load
        yield srv, v1
    finally:
        srv.stop()


def _closed(srv) -> float:
    return rs.metric(srv, "uda_requests_total", {"task": "A", "code": "499"}) or 0.0


def test_queued_requests_of_clients_that_hung_up_are_not_computed(served):
    srv, v1 = served
    lock = srv.runtime.engine._lock
    before = sum(w.batches for w in srv.runtime.workers)
    held: dict[str, httpx.Response] = {}

    def call():
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            held["resp"] = rs.predict(c, "A")

    hits = rs.metric(srv, "uda_residual_cache_hits_total")
    lock.acquire()  # the model thread stops inside the next batch
    try:
        holder = threading.Thread(target=call)
        holder.start()
        rs.wait_for("one request held in its batch",
                    lambda: rs.metric(srv, "uda_residual_cache_hits_total") == hits + 1)
        # The last client pipelines two requests: the second is read only after the first's
        # answer, so three are queued. Only uvicorn's h11 protocol tells a pipelined request
        # its client left (httptools tells the newest only), and uvicorn picks httptools
        # whenever it is installed: the server pins h11.
        assert srv._server.config.http == "h11"
        socks = [_raw_predict(srv.url, "A", rs.IMAGES[0], pipelined=n) for n in (1, 1, 2)]
        rs.wait_for("three requests queued behind it", lambda: srv.runtime.batcher.depth == 3)
        for s in socks:
            s.close()
        rs.wait_for("the three hang-ups counted as 499", lambda: _closed(srv) == 3)
        assert srv.runtime.batcher.depth == 0  # their --max-queue slots are free at once
    finally:
        lock.release()
    holder.join(60)
    assert rs.matches(held["resp"], v1)
    assert sum(w.batches for w in srv.runtime.workers) == before + 1  # only the held batch ran
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.matches(rs.predict(http, "A"), v1)  # and serving goes on
    assert sum(w.batches for w in srv.runtime.workers) == before + 2


def test_a_client_that_hangs_up_mid_upload_is_a_499_not_a_server_error(served, caplog):
    srv, _ = served
    caplog.set_level(logging.INFO, logger="server")
    body = rs.IMAGES[0]
    sock = _raw_predict(srv.url, "A", body[: len(body) // 2], declared=len(body))
    sock.close()
    rs.wait_for("the hang-up counted as 499", lambda: _closed(srv) == 1)
    assert not rs.metric(srv, "uda_requests_total", {"task": "A", "code": "500"})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert any(r.getMessage().endswith("-> 499: the client closed its connection during the upload")
               for r in caplog.records), caplog.text
