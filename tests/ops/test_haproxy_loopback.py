"""deploy/haproxy/haproxy.cfg for real: three `uda-serve` processes on one directory store behind
a real haproxy (Debian's package, scripts/ensure-haproxy.sh) running the shipped config with
only its addresses rewritten (bench.fleet.loopback_config: the bind ports, and three loopback
servers for the DNS template; the benchmark runs the same rewrite).

Which replica answered is read twice: from the X-Uda-Replica header the config adds, and from
each replica's own uda_requests_total, so the test does not only trust the proxy's word.
The failover test runs last: it kills one replica and drains another.
"""
from __future__ import annotations

import base64
import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import loopback_config
from residual_store.stores import open_store
from server.synthetic import image_bytes

from .support import DEPLOY, free_port, live_process, log_tail, stop, wait_for
from .tiny_tasks import CLASSES, MODEL, residual_blob

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
TASKS = [f"T{i:02d}" for i in range(12)]
HOT = "T00"
REPLICAS = 3
IMAGE = image_bytes(7, size=48)


class Fleet:
    def __init__(self, url: str, internal: str, replicas: dict[str, tuple[subprocess.Popen, int]]):
        self.url, self.internal, self.replicas = url, internal, replicas

    def served(self) -> dict[str, dict[str, float]]:
        """replica -> task -> uda_requests_total{code="200"}, from each live replica's /metrics."""
        out = {}
        for name, (proc, port) in self.replicas.items():
            if proc.poll() is not None:
                continue
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            out[name] = {s.labels["task"]: s.value for f in text_string_to_metric_families(text)
                         for s in f.samples
                         if s.name == "uda_requests_total" and s.labels.get("code") == "200"}
        return out

    def up_servers(self) -> set[str]:
        """Replicas HAProxy's health checks hold UP (its stats CSV)."""
        csv = httpx.get(f"{self.internal}/stats;csv", timeout=5).text.splitlines()
        header = csv[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in csv[1:] if line]
        return {r["svname"] for r in rows if r["pxname"] == "uda-serve"
                and r["svname"].startswith("serve") and r["status"].startswith("UP")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, haproxy_bin) -> Fleet:
    tmp = tmp_path_factory.mktemp("haproxy")
    store = open_store(tmp / "store")
    for seed, task in enumerate(TASKS, start=1):
        store.publish(task, residual_blob(task, seed))
    ports = [free_port() for _ in range(REPLICAS)]
    bind, internal = free_port(), free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(loopback_config(CONFIG.read_text(), bind, internal, ports))
    check = subprocess.run([haproxy_bin, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    replicas: dict[str, tuple[subprocess.Popen, int]] = {}
    procs = []
    try:
        for i, port in enumerate(ports, start=1):
            log = tmp / f"serve{i}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "server.cli", "--model", MODEL, "--pretrained", "random", "--store", str(tmp / "store"),
                     "--port", str(port), "--log-level", "warning", "--grace-period", "30",
                     "--max-wait-ms", "5"], stdout=out, stderr=subprocess.STDOUT)
            procs.append(proc)
            replicas[f"serve{i}"] = (proc, port)
        for name, (proc, port) in replicas.items():
            def ready(proc=proc, port=port, name=name):
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited {proc.returncode}:\n{log_tail(tmp / f'{name}.log')}")
                return True if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200 else None
            wait_for(f"{name} ready", ready, timeout=240)
        with live_process("haproxy", [haproxy_bin, "-f", str(cfg)], tmp / "haproxy.log",
                          f"http://127.0.0.1:{internal}/healthz") as _proxy:
            f = Fleet(f"http://127.0.0.1:{bind}", f"http://127.0.0.1:{internal}", replicas)
            wait_for("all replicas UP in haproxy", lambda: f.up_servers() == set(replicas) or None, timeout=60)
            yield f
    finally:
        for proc in procs:
            stop(proc)


def predict(client: httpx.Client, task: str) -> httpx.Response:
    return client.post("/predict", params={"task": task, "top_k": 1}, content=IMAGE,
                       headers={"content-type": "image/png"})


def well_formed(resp: httpx.Response, task: str) -> bool:
    body = resp.json()
    return (resp.status_code == 200 and body["task"] == task
            and body["predictions"][0]["top_k"][0]["label"] in CLASSES)


def test_the_same_task_reaches_the_same_replica_at_low_load(fleet):
    before = fleet.served()
    seen: dict[str, set[str]] = {}
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        for _ in range(3):
            for task in TASKS:
                resp = predict(client, task)
                assert well_formed(resp, task), resp.text
                seen.setdefault(task, set()).add(resp.headers["x-uda-replica"])
    assert all(len(r) == 1 for r in seen.values()), seen
    owner = {task: next(iter(r)) for task, r in seen.items()}
    # The ring spreads twelve tasks over more than one replica.
    assert len(set(owner.values())) >= 2, owner
    # The replicas' own counters agree: each task was computed by its owner only, 3 times.
    after = fleet.served()
    for task in TASKS:
        counted = {name: after[name].get(task, 0) - before[name].get(task, 0) for name in after}
        assert counted == {name: (3 if name == owner[task] else 0) for name in after}, (task, counted)


def test_both_apis_of_one_task_reach_one_replica(fleet):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(IMAGE).decode()]}]}
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        for task in TASKS[:6]:
            predict_resp = predict(client, task)
            infer = client.post(f"/v2/models/{task}/infer", json=body)
            meta = client.get(f"/v2/models/{task}")
            ready = client.get(f"/v2/models/{task}/ready")
            for resp in (predict_resp, infer, meta, ready):
                assert resp.status_code == 200, resp.text
            replicas = {r.headers["x-uda-replica"] for r in (predict_resp, infer, meta, ready)}
            assert len(replicas) == 1, (task, replicas)
            assert infer.json()["model_name"] == task


def test_the_public_route_is_the_inference_api_only(fleet):
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        for path in ("/healthz", "/readyz", "/tasks", "/metrics", "/admin/reload", "/openapi.json"):
            resp = client.get(path)
            assert resp.status_code == 404 and resp.json()["error"] == "not found", path
        assert client.post("/admin/reload").status_code == 404
        assert client.get("/v2/health/ready").status_code == 200


def test_a_task_over_the_balance_factor_spreads(fleet):
    """Many concurrent requests of one task: its replica goes over 1.5x the average load and
    HAProxy sends the overflow to the next replicas on the ring."""
    before = fleet.served()
    big = image_bytes(11, size=384)  # slower to decode: requests overlap on the replica

    def one(client: httpx.Client) -> str:
        resp = client.post("/predict", params={"task": HOT, "top_k": 1}, content=big,
                           headers={"content-type": "image/png"})
        assert well_formed(resp, HOT), resp.text
        return resp.headers["x-uda-replica"]

    with httpx.Client(base_url=fleet.url, timeout=120,
                      limits=httpx.Limits(max_connections=64)) as client, \
            concurrent.futures.ThreadPoolExecutor(24) as pool:
        answered = Counter(pool.map(lambda _: one(client), range(240)))
    assert len(answered) >= 2, f"{HOT} stayed on {answered} under load"
    after = fleet.served()
    counted = {n: after[n].get(HOT, 0) - before[n].get(HOT, 0) for n in after}
    assert {n for n, c in counted.items() if c} == set(answered), (counted, answered)
    assert sum(counted.values()) == 240


def answered(rows: list[tuple[str, int, bool, str]]) -> int:
    return sum(1 for r in rows if r[1] == 200)


def test_killing_and_draining_replicas_under_load_loses_no_request(fleet):
    """SIGKILL one replica, then SIGTERM another, while eight clients keep sending: every
    request is answered 200 with a well-formed prediction (a connection refused, an empty
    answer or a 503 is retried on a live replica), and each one exactly once."""
    names = sorted(fleet.replicas)
    killed, drained, survivor = names[0], names[1], names[2]
    results: list[tuple[str, int, bool, str]] = []
    lock = threading.Lock()
    stop_at = [float("inf")]
    survivor_before = fleet.served()[survivor]

    def client_loop(worker: int) -> None:
        with httpx.Client(base_url=fleet.url, timeout=120) as client:
            i = 0
            while time.monotonic() < stop_at[0]:
                task = TASKS[(worker * 5 + i) % len(TASKS)]
                try:
                    resp = predict(client, task)
                    row = (task, resp.status_code, well_formed(resp, task) if resp.status_code == 200
                           else False, resp.headers.get("x-uda-replica", ""))
                except httpx.HTTPError as e:  # the proxy must not fail a request either
                    row = (task, 0, False, repr(e))
                with lock:
                    results.append(row)
                i += 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(client_loop, w) for w in range(8)]
        wait_for("traffic on every replica", lambda: {r[3] for r in results} >= set(names) or None, 60)
        fleet.replicas[killed][0].send_signal(signal.SIGKILL)
        n_at_kill = len(results)
        wait_for("answers after the kill", lambda: answered(results[n_at_kill:]) > 50 or None, 60)
        fleet.replicas[drained][0].send_signal(signal.SIGTERM)
        assert fleet.replicas[drained][0].wait(timeout=60) == 0  # drained, not killed
        n_at_drain = len(results)
        wait_for("answers after the drain", lambda: answered(results[n_at_drain:]) > 50 or None, 60)
        stop_at[0] = time.monotonic()
        for w in workers:
            w.result()
    failed = [r for r in results if r[1] != 200 or not r[2]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:5]}"
    assert {r[3] for r in results[n_at_drain + 8:]} == {survivor}
    # The replica alive at the end computed exactly the answers the client got from it: a
    # retry never made it compute one request twice.
    counted = fleet.served()[survivor]
    computed = {t: counted.get(t, 0) - survivor_before.get(t, 0) for t in TASKS}
    from_survivor = Counter(r[0] for r in results if r[3] == survivor)
    assert computed == {t: from_survivor.get(t, 0) for t in TASKS}
    wait_for("haproxy marks the dead replicas DOWN", lambda: fleet.up_servers() == {survivor} or None, 30)


def test_the_benchmarks_round_robin_baseline_changes_only_the_balance():
    """bench.fleet's baseline is the shipped config but the task hash (it must not fall back to
    the shipped hashing silently, nor drop the checks and retries)."""
    shipped = CONFIG.read_text()
    affinity = loopback_config(shipped, 1, 2, [3, 4, 5])
    baseline = loopback_config(shipped, 1, 2, [3, 4, 5], balance="roundrobin")
    removed = set(affinity.splitlines()) - set(baseline.splitlines())
    assert {line.strip() for line in removed} == {"balance hdr(X-Uda-Task)", "hash-type consistent",
                                                  "hash-balance-factor 150"}
    assert {line.strip() for line in set(baseline.splitlines()) - set(affinity.splitlines())} == {"balance roundrobin"}
    assert "server serve3 127.0.0.1:5" in affinity and "server-template" not in affinity
