"""Issue 24, item 7: what came from a residual or a request is escaped before it reaches a log
line or an error detail, and error details carry no absolute paths.

A `base_model` with a newline and ANSI escapes could forge a log line ("admin token is ...") and
reached the 503 detail sent to unauthenticated clients verbatim; a refusal's detail named the
store's directory.
"""
from __future__ import annotations

import logging

import httpx
import pytest
import reliability_support as rs

from residual_store import to_bytes
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import random_residual

pytestmark = pytest.mark.integration

FORGED = "ViT\n2026-01-01 00:00:00 ERROR server.app: admin token is hunter2\x1b[2K\x1b[31m"


def _clean(text: str) -> bool:
    return not any(c in text for c in "\n\r\x1b")


def test_metadata_with_newlines_and_escapes_reaches_logs_and_clients_escaped(tmp_path, caplog):
    root = tmp_path / "store"
    alien = random_residual(rs.base(), "A", ["c0", "c1"], base_model=FORGED, seed=3,
                            base_fingerprint="0" * 64)
    open_store(str(root)).publish("A", to_bytes(alien))
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0)
    with caplog.at_level(logging.INFO), EmbeddedServer(cfg) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        resp = rs.predict(http, "A")
        assert resp.status_code == 503 and "hunter2" in resp.json()["detail"], resp.text
        assert _clean(resp.json()["detail"]), resp.json()["detail"]
        refused = [t["refused"]["detail"] for t in http.get("/tasks").json()["tasks"] if t["refused"]]
        assert refused and all(_clean(d) for d in refused), refused
    forged = [r.getMessage() for r in caplog.records if "hunter2" in r.getMessage()]
    assert forged and all(_clean(m) for m in forged), forged


def test_error_details_carry_no_absolute_paths(tmp_path):
    root = tmp_path / "store"
    v1 = rs.make_version("A", 5)
    open_store(str(root)).publish("A", v1.blob)
    blob_file = next((root / "tasks" / "A").glob("v*.safetensors"))
    blob_file.write_bytes(v1.blob[:-1] + bytes([v1.blob[-1] ^ 1]))  # altered after publish
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        resp = rs.predict(http, "A")
        assert resp.status_code == 503, resp.text
        details = [resp.json()["detail"], rs.predict(http, "A").json()["detail"]]
        details += [t["refused"]["detail"] for t in http.get("/tasks").json()["tasks"] if t["refused"]]
        assert len(details) >= 3, details
        assert all(str(tmp_path) not in d for d in details), details
