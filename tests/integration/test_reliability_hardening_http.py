"""Issue 24, items 2, 4 and 5: one unauthenticated client must not hold or freeze the server.

- /v2 JSON bodies: a small default cap (32 MiB with the default --max-batch and
  --max-image-bytes, instead of 855 MiB) refused while the body streams; a body with more JSON
  items than a request of --max-batch images needs is refused before it is parsed.
- Slowloris: a connection must send a whole request head within --header-timeout; connections
  beyond --limit-concurrency are closed at once; accept errors are logged once per interval.
- A body in 1-byte chunks is refused (400) instead of costing seconds of CPU.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.http_limits import install_accept_error_handler

pytestmark = pytest.mark.integration


def _serve(tmp_path_factory, **kw):
    root = tmp_path_factory.mktemp("store")
    v1 = rs.make_version("A", 1)
    open_store(str(root)).publish("A", v1.blob)
    # default --max-batch and --max-image-bytes: the JSON cap under test is derived from them
    return ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0,
                       preload=("A",), request_timeout=30, **kw), v1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg, v1 = _serve(tmp_path_factory, header_timeout=1.0, keep_alive_timeout=1.0)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").status_code == 200
        yield srv, http, v1


def _connect(url: str, timeout: float = 20) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def _closed_by_server(s: socket.socket) -> bool:
    """True when the server closed `s` (recv sees EOF or a reset) before the socket timeout."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _v2(blobs: list[bytes]) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                        "data": [base64.b64encode(b).decode() for b in blobs]}]}


# -- item 2: /v2 JSON bodies ------------------------------------------------------------------


def test_a_100_mb_json_body_is_refused_while_it_streams(served):
    srv, http, v1 = served
    chunk = b"[]," * 21_846  # 64 KiB
    body = (b'{"inputs": [' + chunk if i == 0 else chunk for i in range(1600))  # 100 MiB, chunked
    resp = http.post("/v2/models/A/infer", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "--max-json-bytes" in resp.json()["detail"], resp.text[:300]
    ok = http.post("/v2/models/A/infer", json=_v2([rs.IMAGES[0]]))
    assert ok.status_code == 200, ok.text


def test_a_json_body_of_many_small_items_is_refused_before_it_is_parsed(served):
    srv, http, _ = served
    items = b"[]," * 300_000 + b"[]"  # 900 KB under the byte cap; 300,000 lists once parsed
    body = b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [' + items + b"]}]}"
    resp = http.post("/v2/models/A/infer", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "JSON items" in resp.json()["detail"], resp.text[:300]


def test_a_full_batch_of_images_still_fits_the_json_cap(served):
    srv, http, v1 = served
    resp = http.post("/v2/models/A/infer", json=_v2([rs.IMAGES[i % 3] for i in range(srv.config.max_batch)]))
    assert resp.status_code == 200, resp.text[:300]


# -- item 4: slowloris ------------------------------------------------------------------------


def test_connections_that_send_no_whole_request_head_are_closed(served):
    srv, http, _ = served
    idle = [_connect(srv.url) for _ in range(3)]
    dribbling = [_connect(srv.url) for _ in range(3)]
    for s in dribbling:
        s.sendall(b"POST /predict?task=A HTTP/1.1\r\nHost: x\r\n")
    for _ in range(6):  # one more header byte every 0.3 s, longer than the header timeout
        for s in dribbling:
            try:
                s.sendall(b"X")
            except OSError:
                pass  # closed already: what the test waits for
        time.sleep(0.3)
    assert all(_closed_by_server(s) for s in idle + dribbling)
    for s in idle + dribbling:
        s.close()
    assert rs.predict(http, "A").status_code == 200


def test_a_slow_but_complete_request_head_is_served(served):
    srv, http, v1 = served
    with _connect(srv.url) as s:
        head = (f"POST /predict?task=A&top_k=1000 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(rs.IMAGES[0])}\r\nConnection: close\r\n\r\n").encode()
        s.sendall(head[:20])
        time.sleep(0.3)
        s.sendall(head[20:] + rs.IMAGES[0])
        data = b""
        while part := s.recv(65536):
            data += part
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path_factory):
    cfg, _ = _serve(tmp_path_factory, header_timeout=60.0, limit_concurrency=8)
    with EmbeddedServer(cfg) as srv:
        held = [_connect(srv.url, timeout=5) for _ in range(20)]
        closed = sum(_closed_by_server(s) for s in held[8:])  # 5 s each at most, 60 s head timeout
        assert closed == 12
        for s in held:
            s.close()
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert rs.wait_for("a request once the idle connections left",
                               lambda: rs.predict(http, "A").status_code == 200, 30)


def test_accept_errors_are_logged_once_per_interval(caplog):
    loop = asyncio.new_event_loop()
    try:
        install_accept_error_handler(loop)
        with caplog.at_level(logging.WARNING):
            for _ in range(1000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
    finally:
        loop.close()
    lines = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) <= 1 and not any(r.exc_info for r in lines), [r.getMessage() for r in lines]


# -- item 5: 1-byte chunks ----------------------------------------------------------------------


def test_a_body_in_one_byte_chunks_is_refused(served):
    srv, http, _ = served
    blob = rs.IMAGES[0] + b"\0" * (4096 - len(rs.IMAGES[0]))  # Pillow ignores bytes after IEND
    chunked = b"".join(b"1\r\n" + blob[i:i + 1] + b"\r\n" for i in range(len(blob))) + b"0\r\n\r\n"
    with _connect(srv.url) as s:
        s.sendall(b"POST /predict?task=A HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
        data = b""
        while b"\r\n\r\n" not in data and (part := s.recv(65536)):
            data += part
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    # the same image in one piece is served
    resp = http.post("/predict?task=A", content=blob, headers={"content-type": "image/png"})
    assert resp.status_code == 200, resp.text
