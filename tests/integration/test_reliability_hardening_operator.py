"""Issue 24, item 8: operator traps.

An admin token with a trailing newline (a Kubernetes Secret made from a file) is stripped with a
warning instead of making every admin call 403; one damaged index.json is reported once per
interval, not six times a second; a --cache-bytes below one residual shows in /readyz; --port 0
prints the port it got; /admin/reload answers within a bound while the store hangs.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import time

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration


def _store(tmp_path, *tasks: str) -> str:
    root = tmp_path / "store"
    rs.publish_versions(str(root), list(tasks), first_seed=61)
    return str(root)


def test_an_admin_token_with_a_trailing_newline_works_and_is_warned_about(tmp_path, caplog):
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=_store(tmp_path, "A"), port=0,
                      admin_token=rs.ADMIN_TOKEN + "\n")
    with caplog.at_level(logging.WARNING), EmbeddedServer(cfg) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.post("/admin/reload", headers=rs.admin()).status_code == 200
    assert any("whitespace" in r.getMessage() for r in caplog.records)


def test_a_damaged_index_is_reported_once_per_interval(tmp_path, caplog):
    store = _store(tmp_path, "A", "B")
    (tmp_path / "store" / "tasks" / "B" / "index.json").write_text("{ not json")
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=store, port=0, reconcile_interval=0.1)
    with caplog.at_level(logging.WARNING), EmbeddedServer(cfg) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        time.sleep(1.5)  # 15 reconciles and 7 polls, each listing the damaged task
        assert rs.predict(http, "A").status_code == 200
    damaged = [r for r in caplog.records if "damaged index" in r.getMessage()]
    assert 1 <= len(damaged) <= 2, [r.getMessage() for r in damaged]


def test_a_cache_smaller_than_one_residual_shows_in_readiness(tmp_path):
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=_store(tmp_path, "A"), port=0,
                      cache_bytes=1024)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/readyz").status_code == 200  # nothing was loaded yet
        assert rs.predict(http, "A").status_code == 503
        resp = http.get("/readyz")
        assert resp.status_code == 503 and "--cache-bytes" in resp.json()["detail"], resp.text


def test_a_residual_larger_than_the_cache_is_read_once(tmp_path):
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=_store(tmp_path, "A"), port=0,
                      cache_bytes=1024)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        cache, reads = srv.runtime.cache, []
        real = cache._loader

        def counted(task, version, sha256):
            reads.append(task)
            return real(task, version, sha256)

        cache._loader = counted
        answers = [rs.predict(http, "A") for _ in range(4)]
        assert [r.status_code for r in answers] == [503] * 4
        assert all("--cache-bytes" in r.json()["detail"] for r in answers), answers[-1].text
        assert reads == ["A"]  # the first request read and parsed it; the others did not


def test_port_0_prints_the_port_it_got(tmp_path):
    cmd = rs.uda_serve_command() + ["--model", rs.MODEL, "--pretrained", "random", "--store",
                                    _store(tmp_path, "A"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = rs.wait_for("the URL line", lambda: next(
            (ln for ln in iter(proc.stdout.readline, "") if "send requests to" in ln), None), 120)
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port != 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert rs.predict(http, "A").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_admin_reload_is_bounded_while_redis_hangs(tmp_path):
    redis_srv = rs.PrivateRedis(tmp_path).start()
    try:
        rs.publish_versions(redis_srv.url, ["A"], first_seed=71)
        cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=redis_srv.url, port=0,
                          admin_token=rs.ADMIN_TOKEN, request_timeout=2)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert rs.predict(http, "A").status_code == 200
            redis_srv.proc.send_signal(signal.SIGSTOP)  # hangs: connections open, no answers
            try:
                # today's code blocked 15-40 s here; the bound is --request-timeout (2 s)
                resp = http.post("/admin/reload", headers=rs.admin(), timeout=8)
                assert resp.status_code == 503, resp.text
                assert rs.predict(http, "A").status_code == 200  # cached: keeps serving
            finally:
                redis_srv.proc.send_signal(signal.SIGCONT)
    finally:
        redis_srv.stop()
