"""Issue 6, point 12: admin endpoints, and a predict port that never fetches what a client names.

No token configured: every admin route is disabled (404), whatever the request carries. Token
configured: missing -> 401 (with WWW-Authenticate), wrong -> 403, right -> 200. The predict
routes are given URLs in every place a client can put one; a listener on loopback proves the
server never connects to any of them.
"""
from __future__ import annotations

import base64
import socket
import threading

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

ADMIN_ROUTES = [("post", "/admin/tasks/A/load"), ("post", "/admin/tasks/A/unload"),
                ("post", "/admin/reload"), ("get", "/admin/fingerprint")]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    open_store(str(root)).publish("A", rs.make_version("A", 1).blob)
    return str(root)


def test_no_token_configured_disables_admin(store_root, monkeypatch):
    monkeypatch.delenv("UDA_ADMIN_TOKEN", raising=False)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store_root, port=0, admin_token=None)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for method, path in ADMIN_ROUTES:
            for headers in ({}, rs.admin(), {"authorization": "Bearer x"}, {"authorization": "Basic YWRtaW46YWRtaW4="}):
                resp = http.request(method, path, headers=headers)
                assert resp.status_code == 404, (path, headers, resp.text)
                assert "disabled" in resp.json()["detail"]
        assert rs.predict(http, "A").status_code == 200  # serving is not affected


def test_wrong_token_is_refused(store_root, monkeypatch):
    monkeypatch.delenv("UDA_ADMIN_TOKEN", raising=False)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store_root, port=0, admin_token=rs.ADMIN_TOKEN)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for method, path in ADMIN_ROUTES:
            missing = http.request(method, path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            for headers in ({"authorization": "Bearer"}, {"authorization": "Basic " + base64.b64encode(
                    f"admin:{rs.ADMIN_TOKEN}".encode()).decode()}, {"x-admin-token": rs.ADMIN_TOKEN}):
                assert http.request(method, path, headers=headers).status_code == 401, headers
            for token in ("wrong-token-123", rs.ADMIN_TOKEN.upper(), rs.ADMIN_TOKEN[:-1],
                          rs.ADMIN_TOKEN + "x", rs.ADMIN_TOKEN + " x"):
                resp = http.request(method, path, headers=rs.admin(token))
                assert resp.status_code == 403, (path, token, resp.text)
            assert http.request(method, path, headers=rs.admin()).status_code == 200, path
        assert rs.ADMIN_TOKEN not in http.get("/metrics").text + http.get("/healthz").text


class Listener:
    """A TCP listener on loopback that counts the connections it gets."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_predict_never_fetches_a_url_a_client_sent(store_root):
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/image.png"
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store_root, port=0)
    try:
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            attempts = [
                http.post("/predict", params={"task": "A", "url": url}),
                http.post("/predict", params={"task": url}),
                http.post("/predict?task=A", json={"url": url, "image_url": url}),
                http.post("/predict?task=A", content=url.encode(), headers={"content-type": "text/uri-list"}),
                http.post("/predict?task=A", content=url.encode(), headers={"content-type": "image/png"}),
                http.post("/predict?task=A", data={"url": url}, files=[("file", ("x.png", url.encode(), "image/png"))]),
                http.post("/predict?task=A", files=[("file", ("x.png", rs.IMAGES[0], "image/png"))],
                          headers={"x-forwarded-host": f"127.0.0.1:{listener.port}", "referer": url}),
                http.post("/v2/models/A/infer", json={"inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [1], "data": [url]}]}),
                http.post("/v2/models/A/infer", json={"inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [1],
                     "data": [base64.b64encode(url.encode()).decode()]}], "parameters": {"url": url}}),
                http.get(f"/v2/models/{url}"),
            ]
            codes = [r.status_code for r in attempts]
            assert all(c < 500 for c in codes), codes
            assert codes[-4] == 200  # a real image with hostile headers is simply answered
            assert listener.connections == 0
    finally:
        listener.close()
