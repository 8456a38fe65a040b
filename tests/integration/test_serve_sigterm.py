"""`uda-serve` as a real process: the start banner, and SIGTERM draining queued requests, exit 0."""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from residual_store import BaseSpec, to_bytes
from residual_store.stores import open_store
from server.embedded import free_port
from server.synthetic import image_bytes, random_residual

pytestmark = pytest.mark.integration


def _command() -> list[str]:
    script = shutil.which("uda-serve", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "server.cli"]


def test_sigterm_drains_queued_requests_and_exits_0(tmp_path):
    base = BaseSpec("uda-tiny-rn").build()
    store = open_store(str(tmp_path / "store"))
    store.publish("Drain", to_bytes(random_residual(base, "Drain", ["a", "b"], base_model="uda-tiny-rn")))
    port = free_port()
    proc = subprocess.Popen(
        _command() + ["--model", "uda-tiny-rn", "--store", str(tmp_path / "store"), "--port", str(port),
                      "--max-batch", "16", "--grace-period", "60", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uda-serve did not become ready"
            time.sleep(0.2)

        files = [("file", (f"{i}.png", image_bytes(i, size=64), "image/png")) for i in range(16)]
        finished: list[float] = []

        def call(_):
            with httpx.Client(base_url=url, timeout=120) as c:
                resp = c.post("/predict?task=Drain", files=files)
            finished.append(time.monotonic())
            return resp

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(call, i) for i in range(8)]
            while not finished:  # the server is busy: the others are queued or running
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 8
        assert all(len(r.json()["predictions"]) == 16 for r in responses)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "fingerprint" in out and f"http://127.0.0.1:{port}/predict?task=Drain" in out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

