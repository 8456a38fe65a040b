"""Issue 6, point 11: graceful drain of a real `uda-serve` process.

SIGTERM while requests are in flight: every one of them completes with the right answer;
readiness fails at once and new work is refused (the listening socket closes: a new connection
is refused or answered 503); the process exits 0 before --grace-period runs out.
"""
from __future__ import annotations

import concurrent.futures
import logging
import signal
import subprocess
import threading
import time

import httpx
import pytest
import reliability_support as rs

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

GRACE_S = 90


def _refused(url: str, path: str, **kw) -> bool:
    """True when the server takes no new work on a new connection."""
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            resp = c.request("POST" if path.startswith("/predict") else "GET", path, **kw)
        return resp.status_code == 503
    except httpx.TransportError:  # connection refused or closed: not accepting
        return True


CLIENTS, IMAGES_PER_REQUEST = 8, 16
MODEL = "uda-tiny-rn"  # slower than the ViT: requests pile up in the queue


def _queue_depth(url: str) -> int:
    return int(rs.metric(httpx.get(f"{url}/metrics", timeout=10).text, "uda_queue_depth") or 0)


def test_sigterm_drains_in_flight_requests_and_refuses_new_work(tmp_path):
    model = rs.base(MODEL)
    residual = rs.random_residual(model, "Drain", ["a", "b", "c"], base_model=MODEL, seed=1)
    expected = rs.reference_scores(model, residual, rs.tensors(rs.IMAGES, size=64))
    open_store(str(tmp_path / "store")).publish("Drain", rs.to_bytes(residual))
    port = rs.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(rs.uda_serve_command() + [
        "--model", MODEL, "--pretrained", "random", "--store", str(tmp_path / "store"), "--port", str(port),
        "--max-batch", str(IMAGES_PER_REQUEST), "--grace-period", str(GRACE_S), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rs.wait_for("uda-serve ready", lambda: proc.poll() is None and
                    httpx.get(f"{url}/readyz", timeout=2).status_code == 200, timeout=240, interval=0.2)
        files = [("file", (f"{i}.png", rs.IMAGES[i % 3], "image/png")) for i in range(IMAGES_PER_REQUEST)]

        def call(_):
            with httpx.Client(base_url=url, timeout=GRACE_S) as c:
                return c.post("/predict?task=Drain&top_k=3", files=files)

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(call, i) for i in range(CLIENTS)]
            # In flight = received by the server: queued there or answered, one running, and
            # several still queued when the signal comes. "One running" holds once a batch has
            # been answered: before that the residual may still be loading, nothing runs, and
            # CLIENTS - 1 queued or answered leaves one request that may not have arrived yet.
            rs.wait_for("requests in flight", lambda: (d := _queue_depth(url)) >= 2 and
                        (done := sum(f.done() for f in futures)) >= 1 and d + done >= CLIENTS - 1,
                        interval=0.01)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            refused_ready = _refused(url, "/readyz")
            refused_work = _refused(url, "/predict?task=Drain", content=rs.IMAGES[0],
                                    headers={"content-type": "image/png"})
            responses = [f.result() for f in futures]
        out, _ = proc.communicate(timeout=GRACE_S + 30)
        exited_after = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert refused_ready and refused_work
    assert [r.status_code for r in responses] == [200] * CLIENTS, [r.text for r in responses if r.status_code != 200]
    for r in responses:
        for i, pred in enumerate(r.json()["predictions"]):
            top = {t["index"]: t["score"] for t in pred["top_k"]}
            assert all(abs(top[k] - float(expected[i % 3][k])) <= 1e-5 for k in top)
    assert proc.returncode == 0, out
    assert exited_after < GRACE_S, f"exit took {exited_after:.0f} s, the grace period is {GRACE_S} s"
    assert "Traceback" not in out and "uda-serve: stopped" in out



class HeldBatch:
    """A server answering task A one image per batch, its model thread held inside a batch
    (the engine's lock) with three more requests queued behind it. `outcomes` are the four
    clients' status codes (or transport error names); `before` counts the batches run first."""

    def __init__(self, tmp_path, grace_period: float):
        self.version = rs.make_version("A", 1)
        open_store(str(tmp_path / "store")).publish("A", self.version.blob)
        self.srv = EmbeddedServer(ServeConfig(model=rs.MODEL, pretrained="random",
                                              store=str(tmp_path / "store"), port=0,
                                              max_batch=1, grace_period=grace_period))
        self._lock = self.srv.runtime.engine._lock
        self._held = False
        self._pool = concurrent.futures.ThreadPoolExecutor(4)

    def _call(self) -> int | str:
        with httpx.Client(base_url=self.srv.url, timeout=GRACE_S) as c:
            try:
                return rs.predict(c, "A").status_code
            except httpx.TransportError as e:
                return type(e).__name__

    def __enter__(self) -> HeldBatch:
        self.srv.start()
        try:
            with httpx.Client(base_url=self.srv.url, timeout=60) as http:
                assert rs.matches(rs.predict(http, "A"), self.version)  # resident: nothing to load
            self.before = self.batches()
            self._lock.acquire()  # the model thread stops inside the next batch
            self._held = True
            self._futures = [self._pool.submit(self._call) for _ in range(4)]
            rs.wait_for("one request held in its batch, three queued",
                        lambda: self.srv.runtime.batcher.depth == 3)
        except BaseException:
            self.__exit__()
            raise
        return self

    def outcomes(self) -> list[int | str]:
        return [f.result(GRACE_S) for f in self._futures]

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def batches(self) -> int:
        return sum(w.batches for w in self.srv.runtime.workers)

    def __exit__(self, *exc) -> None:
        self.release()
        self.srv.stop()
        self._pool.shutdown()


def test_requests_cancelled_by_the_shutdown_are_not_computed(tmp_path):
    """uvicorn's graceful shutdown gives up after --grace-period and cancels the requests still
    open; nobody reads their answers any more, so the drain must skip them instead of running
    one batch each."""
    with HeldBatch(tmp_path, grace_period=1.0) as held:
        stopper = threading.Thread(target=held.srv.stop)
        stopper.start()
        outcomes = held.outcomes()  # uvicorn's 500 each, once it cancelled the request
        held.release()
        stopper.join(60)
    assert 200 not in outcomes, outcomes  # the shutdown cancelled all four
    assert held.batches() == held.before + 1  # only the held batch ran


def test_a_second_ctrl_c_quits_at_once_without_computing_the_queue(tmp_path, caplog):
    """The first Ctrl-C drains; the second is uvicorn's force quit: the event loop ends with
    requests still open. The queue behind the running batch must not be computed, and answers
    that find the loop gone must not crash the model thread's steps."""
    caplog.set_level(logging.WARNING, logger="server")
    with HeldBatch(tmp_path, grace_period=GRACE_S) as held:
        srv = held.srv
        srv._server.handle_exit(signal.SIGINT, None)
        rs.wait_for("the drain begun at the first signal",
                    lambda: srv.runtime.readiness(require_store=False), timeout=10)
        srv._server.handle_exit(signal.SIGINT, None)
        outcomes = held.outcomes()  # cut while the batch is held
        held.release()
        rs.wait_for("the server thread and the model thread ended", lambda: not srv._thread.is_alive()
                    and not any(w.alive for w in srv.runtime.workers), timeout=GRACE_S / 3)
    assert 200 not in outcomes, outcomes  # the force quit cut every connection
    assert held.batches() == held.before + 1  # only the held batch ran
    assert srv.runtime.stopped
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
