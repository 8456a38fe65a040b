"""`uda-serve` as a real process: the start banner, SIGTERM draining queued requests (exit 0), and
a second Ctrl-C quitting at once (exit 130)."""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
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


def _start_ready(tmp_path, *flags: str) -> tuple[subprocess.Popen, int]:
    """A `uda-serve` process serving task Drain on uda-tiny-rn, once it is ready."""
    base = BaseSpec("uda-tiny-rn").build()
    store = open_store(str(tmp_path / "store"))
    store.publish("Drain", to_bytes(random_residual(base, "Drain", ["a", "b"], base_model="uda-tiny-rn")))
    port = free_port()
    proc = subprocess.Popen(
        _command() + ["--model", "uda-tiny-rn", "--pretrained", "random", "--store", str(tmp_path / "store"),
                      "--port", str(port), "--log-level", "warning", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"uda-serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("uda-serve did not become ready")
        time.sleep(0.2)


def test_sigterm_drains_queued_requests_and_exits_0(tmp_path):
    proc, port = _start_ready(tmp_path, "--max-batch", "16", "--grace-period", "60")
    url = f"http://127.0.0.1:{port}"
    try:

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



def test_a_second_ctrl_c_quits_at_once_with_exit_130(tmp_path):
    """A client still uploading keeps the first Ctrl-C's drain waiting (up to --grace-period);
    the second one quits without waiting, and says so."""
    proc, port = _start_ready(tmp_path, "--grace-period", "600")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /predict?task=Drain HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
            seen = b""
            while b"100 Continue" not in seen:  # the route has begun to read the body
                chunk = sock.recv(1024)
                assert chunk, seen
                seen += chunk
            sock.sendall(b"\x89PNG")
            proc.send_signal(signal.SIGINT)
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # draining: waits for the upload
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "stopped (forced" in out, out
        # uvicorn logs the requests it cancels; the runtime itself stops cleanly
        assert "model thread" not in out and "Event loop is closed" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
