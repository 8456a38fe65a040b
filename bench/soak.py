"""Soak: mixed traffic on a real `uda-serve` for --minutes, with the store changing under it.

    python -m bench.soak --minutes 30                  # the issue's run: 100 tiny tasks
    python -m bench.soak --minutes 2 --tasks 20        # the CI smoke

The server is a `uda-serve` subprocess on uda-tiny-vit over a store with --tasks tasks (two
residuals each), a cache for about a fifth of them (so evictions are routine), and an admin
token. Client threads loop on random tasks and images; --malformed of their requests are
hostile (garbage bytes, truncated images, unknown or invalid task names, wrong content type).
Every --churn-every seconds one task is republished, rolled back or evicted. With
--hostile-every S one more thread sends issue 24's hostile inputs (bench/hostile.py: a
long-thin PNG, a many-scan JPEG, a 100 MB JSON body, slowloris connections, 1-byte chunks),
one every S seconds, each of which must get a 4xx or a closed connection. Checked: zero 5xx
for well-formed requests, every 200 equal to the reference of the version it names, the base
fingerprint unchanged, server RSS growth after warm-up under --max-rss-growth. Prints the
figures; exit 0 when every check holds, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import hostile
from bench.hostile import KINDS as HOSTILE_KINDS
from bench.lite import free_port

logger = logging.getLogger(__name__)

MODEL = "uda-tiny-vit"
SIZE = 32
TOKEN = "soak-admin-token-0123"
N_IMAGES = 4
ATOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Variant:
    blob: bytes
    expected: list[list[float]]  # per image, softmax scores over the task's classes


@dataclasses.dataclass
class Figures:
    """Everything counted during the run (client threads update it under `lock`)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    codes: Counter = dataclasses.field(default_factory=Counter)  # well-formed requests by status
    malformed_codes: Counter = dataclasses.field(default_factory=Counter)
    checked: int = 0  # 200 answers compared with their reference
    wrong: list[str] = dataclasses.field(default_factory=list)
    transport_errors: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    actions: Counter = dataclasses.field(default_factory=Counter)
    rss: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (seconds, bytes)
    fingerprints: list[bool] = dataclasses.field(default_factory=list)
    hostile: Counter = dataclasses.field(default_factory=Counter)  # (kind, outcome) -> count
    hostile_seconds: dict = dataclasses.field(default_factory=dict)  # kind -> [seconds]
    peak_total_rss: int = 0  # the server and its decode processes together


def build_tasks(n_tasks: int, seed: int) -> tuple[dict[str, list[Variant]], list[bytes], int]:
    """Two residuals per task with reference scores for the shared images; the largest device
    footprint of one residual (index + values + head, in bytes)."""
    import torch
    from PIL import Image

    from residual_store import BaseSpec, to_bytes
    from residual_store.preprocess import eval_transform
    from server.synthetic import image_bytes, random_residual, reference_scores

    model = BaseSpec(MODEL).build()
    blobs = [image_bytes(seed * 100 + i, fmt=("PNG", "JPEG", "WEBP", "PNG")[i % 4]) for i in range(N_IMAGES)]
    t = eval_transform(SIZE)
    x = torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    tasks, largest = {}, 0
    for i in range(n_tasks):
        name = f"soak-{i:03d}"
        classes = [f"c{k}" for k in range(3 + i % 5)]
        variants = []
        for j in range(2):
            r = random_residual(model, name, classes, base_model=MODEL, seed=seed * 10_000 + i * 2 + j)
            variants.append(Variant(to_bytes(r), reference_scores(model, r, x).tolist()))
            head = sum(v.numel() * v.element_size() for v in r.head.values())
            largest = max(largest, r.nnz * 12 + head)
        tasks[name] = variants
    return tasks, blobs, largest


class Reference:
    """(task, version) -> Variant, kept in step with every publish and rollback."""

    def __init__(self):
        self.lock = threading.Lock()  # held across a store write and its recording
        self.by_version: dict[tuple[str, int], Variant] = {}

    def lookup(self, task: str, version: int) -> Variant | None:
        with self.lock:
            return self.by_version.get((task, version))


def start_server(store_url: str, port: int, cache_bytes: int, log_path: Path) -> subprocess.Popen:
    exe = shutil.which("uda-serve", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "server.cli"]
    cmd += ["--model", MODEL, "--pretrained", "random", "--store", store_url, "--port", str(port),
            "--cache-bytes", str(cache_bytes), "--max-batch", "16", "--reconcile-interval", "1", "--admin-token", TOKEN,
            "--log-level", "warning", "--max-image-bytes", "1MiB"]
    log = open(log_path, "w")  # noqa: SIM115 - the child writes it until it exits
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uda-serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"uda-serve not ready within {timeout:g} s")


def malformed_request(rng: random.Random, tasks: list[str], images: list[bytes]) -> dict:
    task = rng.choice(tasks)
    kind = rng.randrange(6)
    if kind == 0:
        return {"params": {"task": task}, "content": os.urandom(rng.randrange(1, 400)),
                "headers": {"content-type": "image/png"}}
    if kind == 1:
        img = rng.choice(images)
        return {"params": {"task": task}, "content": img[: len(img) // 2], "headers": {"content-type": "image/jpeg"}}
    if kind == 2:
        return {"params": {"task": f"no-such-{rng.randrange(10**6)}"}, "content": images[0],
                "headers": {"content-type": "image/png"}}
    if kind == 3:
        return {"params": {"task": "../" + task}, "content": images[0], "headers": {"content-type": "image/png"}}
    if kind == 4:
        return {"params": {"task": task}, "content": b"hello", "headers": {"content-type": "text/plain"}}
    return {"params": {"task": task, "top_k": 0}, "content": images[0], "headers": {"content-type": "image/png"}}


def client_loop(url: str, seed: int, tasks: list[str], images: list[bytes], ref: Reference,
                figures: Figures, malformed: float, stop: threading.Event) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            if rng.random() < malformed:
                try:
                    resp = http.post("/predict", **malformed_request(rng, tasks, images))
                    with figures.lock:
                        figures.malformed_codes[resp.status_code] += 1
                except httpx.TransportError as e:
                    with figures.lock:
                        figures.malformed_codes[f"transport:{type(e).__name__}"] += 1
                continue
            task, k = rng.choice(tasks), rng.randrange(len(images))
            t0 = time.perf_counter()
            try:
                resp = http.post("/predict", params={"task": task, "top_k": 1000}, content=images[k],
                                 headers={"content-type": "image/png"})
            except httpx.TransportError as e:
                with figures.lock:
                    figures.transport_errors.append(f"{task}: {e!r}")
                continue
            latency = time.perf_counter() - t0
            problem = check(resp, task, k, ref) if resp.status_code == 200 else None
            with figures.lock:
                figures.codes[resp.status_code] += 1
                figures.latencies.append(latency)
                if resp.status_code == 200:
                    figures.checked += 1
                if problem:
                    figures.wrong.append(problem)


def check(resp, task: str, k: int, ref: Reference) -> str | None:
    body = resp.json()
    variant = ref.lookup(task, body["version"])
    if variant is None:
        return f"{task}: answered unknown version {body['version']}"
    expected = variant.expected[k]
    got = {item["index"]: item["score"] for item in body["predictions"][0]["top_k"]}
    if set(got) != set(range(len(expected))):
        return f"{task} v{body['version']}: {len(got)} classes, expected {len(expected)}"
    worst = max(abs(got[i] - expected[i]) for i in range(len(expected)))
    return None if worst <= ATOL else f"{task} v{body['version']} image {k}: off by {worst:.2e}"


def churn_loop(url: str, store, tasks: dict[str, list[Variant]], ref: Reference, figures: Figures,
               every: float, seed: int, stop: threading.Event) -> None:
    """Every `every` seconds: republish the other residual of a task, roll one back, or evict one."""
    import httpx

    from residual_store.errors import ResidualStoreError

    rng = random.Random(seed)
    names = sorted(tasks)
    serving = {t: 0 for t in names}  # index of the variant each task's current version holds
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.wait(every):
            task = rng.choice(names)
            action = rng.choice(("publish", "publish", "rollback", "evict"))
            try:
                if action == "publish":
                    with ref.lock:
                        serving[task] ^= 1
                        info = store.publish(task, tasks[task][serving[task]].blob)
                        ref.by_version[task, info.version] = tasks[task][serving[task]]
                elif action == "rollback":
                    versions = store.versions(task)
                    if len(versions) < 2:
                        continue
                    old = rng.choice(versions[:-1]).version
                    with ref.lock:
                        info = store.rollback(task, old)
                        ref.by_version[task, info.version] = ref.by_version[task, old]
                        serving[task] = tasks[task].index(ref.by_version[task, old])
                else:
                    resp = http.post(f"/admin/tasks/{task}/unload", headers={"authorization": f"Bearer {TOKEN}"})
                    if resp.status_code != 200:
                        raise RuntimeError(f"unload {task}: {resp.status_code} {resp.text}")
                with figures.lock:
                    figures.actions[action] += 1
            except (ResidualStoreError, RuntimeError, httpx.TransportError) as e:
                logger.warning("churn %s %s failed: %s", action, task, e)
                with figures.lock:
                    figures.actions[f"{action}_failed"] += 1


def monitor_loop(url: str, pid: int, figures: Figures, start: float, stop: threading.Event) -> None:
    import httpx
    import psutil

    proc = psutil.Process(pid)
    last_fp = 0.0
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.wait(2.0):
            now = time.monotonic() - start
            rss = proc.memory_info().rss
            total = rss + sum(_rss(child) for child in proc.children(recursive=True))
            with figures.lock:
                figures.rss.append((now, rss))
                figures.peak_total_rss = max(figures.peak_total_rss, total)
            if now - last_fp >= 30:
                last_fp = now
                fingerprint_check(http, figures)


def _rss(proc) -> int:
    import psutil

    try:
        return proc.memory_info().rss
    except psutil.Error:  # a decode process killed meanwhile
        return 0


def hostile_loop(url: str, kinds: list[str], tasks: list[str], figures: Figures, every: float,
                 stop: threading.Event) -> None:
    for kind in kinds:  # built before the clock matters
        {"long-thin": hostile.long_thin_png, "many-scans": hostile.many_scans_jpeg,
         "big-decode": hostile.big_decode_jpeg}.get(kind, lambda: None)()
    i = 0
    while not stop.wait(every):
        kind = kinds[i % len(kinds)]
        i += 1
        try:
            outcome, seconds = hostile.send(kind, url, tasks[i % len(tasks)])
        except OSError as e:
            outcome, seconds = f"error:{type(e).__name__}", float("nan")
        with figures.lock:
            figures.hostile[kind, outcome] += 1
            figures.hostile_seconds.setdefault(kind, []).append(seconds)


def fingerprint_check(http, figures: Figures) -> None:
    fp = http.get("/admin/fingerprint", headers={"authorization": f"Bearer {TOKEN}"}).json()
    with figures.lock:
        figures.fingerprints.append(bool(fp.get("unchanged")))


def rss_growth(samples: list[tuple[float, int]], warmup_s: float) -> tuple[int, int, float]:
    """(baseline, final, growth %): medians of the first and last fifth of the samples taken
    after the warm-up."""
    after = [rss for t, rss in samples if t >= warmup_s] or [rss for _, rss in samples]
    n = max(1, len(after) // 5)
    baseline, final = int(statistics.median(after[:n])), int(statistics.median(after[-n:]))
    return baseline, final, 100.0 * (final - baseline) / baseline


def report(args, figures: Figures, seconds: float, log_path: Path) -> bool:
    lat = sorted(figures.latencies)
    well = sum(figures.codes.values())
    five = sum(n for code, n in figures.codes.items() if code >= 500)
    bad_malformed = sum(n for code, n in figures.malformed_codes.items() if not isinstance(code, int) or code >= 500)
    baseline, final, growth = rss_growth(figures.rss, args.warmup_minutes * 60)
    log_text = log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback")
    checks = {
        "zero 5xx for well-formed requests": five == 0 and not figures.transport_errors,
        "every answer equals its reference": not figures.wrong and figures.checked > 0,
        "malformed requests got 4xx": bad_malformed == 0,
        f"RSS growth after warm-up < {args.max_rss_growth:g}%": growth < args.max_rss_growth,
        "base fingerprint unchanged": bool(figures.fingerprints) and all(figures.fingerprints),
        "no traceback in the server log": tracebacks == 0,
    }
    if args.hostile_every:
        checks["hostile inputs got 4xx or a closed connection"] = bool(figures.hostile) and all(
            outcome == "closed" or (outcome.isdigit() and 400 <= int(outcome) < 500)
            or (outcome == "200" and kind in hostile.ACCEPTED) for kind, outcome in figures.hostile)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3) if lat else (lambda q: float("nan"))
    print(f"soak: {seconds / 60:.1f} min on {MODEL}, {args.tasks} tasks x 2 residuals, {args.clients} clients, "
          f"cache for ~{args.cache_tasks} tasks, churn every {args.churn_every:g} s, "
          f"{args.malformed * 100:g}% malformed, store {args.store or 'directory'}" +
          (f", hostile every {args.hostile_every:g} s: {','.join(args.hostile_kinds)}"
           if args.hostile_every else ""))
    print(f"  well-formed requests {well} ({well / seconds:.1f}/s): " +
          ", ".join(f"{code}: {n}" for code, n in sorted(figures.codes.items())) +
          f"; transport errors {len(figures.transport_errors)}")
    print(f"  latency p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {pct(1.0):.1f} ms")
    print(f"  answers checked against their reference: {figures.checked}, wrong: {len(figures.wrong)}")
    print(f"  malformed requests {sum(figures.malformed_codes.values())}: " +
          ", ".join(f"{code}: {n}" for code, n in sorted(figures.malformed_codes.items(), key=str)))
    print("  store churn: " + ", ".join(f"{k} {v}" for k, v in sorted(figures.actions.items())))
    print(f"  server RSS after {args.warmup_minutes:g} min warm-up: {baseline / 2**20:.1f} MiB -> "
          f"{final / 2**20:.1f} MiB ({growth:+.2f}%), {len(figures.rss)} samples")
    if args.hostile_every:
        for kind, secs in sorted(figures.hostile_seconds.items()):
            outcomes = ", ".join(f"{o}: {n}" for (k, o), n in sorted(figures.hostile.items()) if k == kind)
            print(f"  hostile {kind}: {outcomes}; median {statistics.median(secs):.2f} s to the answer")
        print(f"  peak RSS of the server and its decode processes: {figures.peak_total_rss / 2**20:.1f} MiB")
    print(f"  fingerprint checks {len(figures.fingerprints)}, all unchanged: {all(figures.fingerprints)}")
    print(f"  server log: {tracebacks} tracebacks, {log_text.count(' ERROR ')} ERROR lines")
    for problem in (figures.wrong + figures.transport_errors)[:5]:
        print(f"  problem: {problem}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return all(checks.values())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="how long the traffic runs")
    p.add_argument("--tasks", type=int, default=100, help="tiny tasks in the store")
    p.add_argument("--clients", type=int, default=4, help="client threads")
    p.add_argument("--cache-tasks", type=int, default=20, help="residuals the cache holds (evictions beyond)")
    p.add_argument("--churn-every", type=float, default=3.0, help="seconds between publishes/rollbacks/evictions")
    p.add_argument("--malformed", type=float, default=0.01, help="fraction of hostile requests")
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="RSS baseline taken after this (default: a fifth of --minutes, at most 5)")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="percent allowed after warm-up")
    p.add_argument("--store", default=None,
                   help="redis://host:port/0 to soak on Redis (a unique prefix, removed after); "
                        "default: a temporary directory store")
    p.add_argument("--hostile-every", type=float, default=0.0,
                   help="seconds between issue 24's hostile inputs (0: none)")
    p.add_argument("--hostile-kinds", default=",".join(HOSTILE_KINDS),
                   help="comma-separated: " + ", ".join(HOSTILE_KINDS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.hostile_kinds = [k for k in args.hostile_kinds.split(",") if k]
    problems = []
    if args.minutes <= 0:
        problems.append(f"--minutes {args.minutes} must be > 0")
    if args.tasks < 1 or args.clients < 1 or args.cache_tasks < 1:
        problems.append("--tasks, --clients and --cache-tasks must be >= 1")
    if not 0 <= args.malformed < 1:
        problems.append(f"--malformed {args.malformed} must be in [0, 1)")
    if args.hostile_every < 0 or not set(args.hostile_kinds) <= set(HOSTILE_KINDS) or not args.hostile_kinds:
        problems.append(f"--hostile-every must be >= 0 and --hostile-kinds among {','.join(HOSTILE_KINDS)}")
    if args.churn_every <= 0:
        problems.append(f"--churn-every {args.churn_every} must be > 0")
    if problems:
        p.error("; ".join(problems))
    if args.warmup_minutes is None:
        args.warmup_minutes = min(5.0, args.minutes / 5)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from residual_store.stores import open_store

    print(f"soak: building {args.tasks} tasks x 2 residuals and their references...", flush=True)
    tasks, images, largest = build_tasks(args.tasks, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="uda-soak-"))
    prefix = f"uda-soak:{uuid.uuid4().hex[:8]}:"
    store_url = f"{args.store}?prefix={prefix}" if args.store else str(tmp / "store")
    store = open_store(store_url)
    ref = Reference()
    for name, variants in tasks.items():
        ref.by_version[name, store.publish(name, variants[0].blob).version] = variants[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "uda-serve.log"
    proc = start_server(store_url, port, int(largest * args.cache_tasks * 1.1), log_path)
    figures, stop = Figures(), threading.Event()
    ok = False
    try:
        wait_ready(url, proc)
        start = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(url, args.seed * 1000 + i, sorted(tasks), images,
                                                                ref, figures, args.malformed, stop))
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=churn_loop, args=(url, store, tasks, ref, figures,
                                                                  args.churn_every, args.seed, stop)))
        if args.hostile_every:
            threads.append(threading.Thread(target=hostile_loop, args=(
                url, args.hostile_kinds, sorted(tasks), figures, args.hostile_every, stop)))
        threads.append(threading.Thread(target=monitor_loop, args=(url, proc.pid, figures, start, stop)))
        for t in threads:
            t.start()
        print(f"soak: traffic for {args.minutes:g} min against {url} (server log {log_path})", flush=True)
        try:
            stop.wait(args.minutes * 60)
        finally:
            stop.set()
            for t in threads:
                t.join()
        import httpx

        with httpx.Client(base_url=url, timeout=60) as http:
            fingerprint_check(http, figures)
        seconds = time.monotonic() - start
        ok = report(args, figures, seconds, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if args.store:
            import redis

            r = redis.Redis.from_url(args.store)
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                r.delete(*keys)
        store.close()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"soak: {'PASS' if ok else 'FAIL'}" + ("" if ok else f" (server log kept in {log_path})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
