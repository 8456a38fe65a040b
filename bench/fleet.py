"""Several uda-serve replicas behind HAProxy: does task affinity pay? (issue 19)

    nice -n 10 .venv/bin/python -m bench.fleet                  # uda-tiny-vit, 500 tasks, ~10 minutes
    nice -n 10 .venv/bin/python -m bench.fleet --duration 10 --rounds 1   # a quick look

500 tasks (random residuals of the tiny base, seeded random weights: timing does not depend on
the weights) in one directory store; closed-loop clients send /predict requests with Zipf(1.0)
task popularity through a real haproxy (Debian's package, scripts/ensure-haproxy.sh) running
deploy/haproxy/haproxy.cfg with only its addresses rewritten, to three fleets in turn:

  1 replica          the shipped config, one server
  3 affinity         the shipped config (hash on the task, hash-balance-factor), three servers
  3 round-robin      the shipped config with `balance roundrobin` instead of the task hash

Every replica's --cache-bytes holds --cache-tasks residuals (200 of 500 by default), so one
replica, or three that each see every task, must reload the tail of the Zipf stream, while
three replicas each owning a third of the tasks keep theirs resident. Each fleet starts cold,
gets --warmup seconds, then --duration measured seconds; fleets take turns for --rounds rounds.
Reported per fleet: throughput, p50/p99 latency (client side, through the proxy), cache hit
ratio and swaps/s summed over the replicas' /metrics, errors. Paste the table into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
FLEETS = (("1 replica", 1, "affinity"), ("3 affinity", 3, "affinity"),
          ("3 round-robin", 3, "roundrobin"))


def loopback_config(text: str, bind: int, internal: int, ports: list[int],
                    balance: str = "affinity") -> str:
    """deploy/haproxy/haproxy.cfg with only its addresses changed: the two binds on loopback
    ports and the DNS server-template replaced by one server per local replica (the
    default-server line keeps every check and retry setting). `balance="roundrobin"` swaps the
    task hash for round-robin, the baseline of the benchmark."""
    (template,) = re.findall(r"^\s*server-template .*$", text, re.M)
    servers = "\n".join(f"    server serve{i} 127.0.0.1:{p}" for i, p in enumerate(ports, start=1))
    out = text.replace(template, servers)
    out, n_public = re.subn(r"^(\s*)bind :8080$", rf"\g<1>bind 127.0.0.1:{bind}", out, flags=re.M)
    out, n_internal = re.subn(r"^(\s*)bind :8404$", rf"\g<1>bind 127.0.0.1:{internal}", out, flags=re.M)
    if (n_public, n_internal) != (1, 1):
        raise ValueError("the binds of deploy/haproxy/haproxy.cfg moved: update loopback_config")
    if balance == "roundrobin":
        out, n = re.subn(r"^(\s*)balance hdr\(X-Uda-Task\)\n\s*hash-type consistent\n\s*hash-balance-factor \d+\n",
                         r"\g<1>balance roundrobin\n", out, flags=re.M)
        if n != 1:
            raise ValueError("the balance lines of deploy/haproxy/haproxy.cfg moved: update loopback_config")
    return out


def residual_cache_bytes(model: str, store_dir: Path, task: str) -> int:
    """Bytes one residual of the store takes in a server's cache."""
    from residual_store import BaseSpec, from_bytes
    from residual_store.flat import ParamLayout
    from residual_store.stores import open_store
    from server.cache import cached_nbytes, resident_form

    residual = from_bytes(open_store(str(store_dir)).get(task)[1])
    layout = ParamLayout.of(BaseSpec(model).build().visual)
    return cached_nbytes(resident_form(residual, layout), residual.build_head())


def start_fleet(args, store: Path, n: int, balance: str, tmp: Path, cache_bytes: int):
    from bench.lite import free_port

    ports = [free_port() for _ in range(n)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--model", args.model, "--pretrained", "random",
         "--store", str(store), "--port", str(p), "--cache-bytes", str(cache_bytes),
         "--max-batch", str(args.max_batch), "--max-queue", "100000", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    bind, internal = free_port(), free_port()
    cfg = tmp / f"haproxy-{n}-{balance}.cfg"
    cfg.write_text(loopback_config(CONFIG.read_text(), bind, internal, ports, balance))
    proxy = subprocess.Popen([args.haproxy, "-f", str(cfg)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    return procs + [proxy], f"http://127.0.0.1:{bind}", [f"http://127.0.0.1:{p}" for p in ports]


async def wait_ready(client, urls: list[str], procs, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a uda-serve or haproxy process exited before the fleet was ready")
        try:
            if (await client.get(f"{pending[0]}/readyz")).status_code == 200:
                pending.pop(0)
                continue
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    if pending:
        raise SystemExit(f"{pending[0]} did not become ready")
    await asyncio.sleep(3)  # HAProxy's checks: rise 2 at a 2 s interval once up


async def counters(client, urls: list[str]) -> dict[str, float]:
    """serve_load's counters, summed over the replicas."""
    from bench.serve_load import _METRICS

    out = dict.fromkeys(_METRICS, 0.0)
    for url in urls:
        text = (await client.get(f"{url}/metrics")).text
        for name in _METRICS:
            m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
            out[name] += float(m.group(1)) if m else 0.0
    return out


async def measure(args, proxy_url: str, replica_urls: list[str], procs, tasks: list[str],
                  image: bytes, seed: int) -> dict:
    import httpx

    from bench.lite import closed_loop

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await wait_ready(client, replica_urls, procs)
        return await closed_loop(client, proxy_url, tasks, image, concurrency=args.concurrency,
                                 warmup=args.warmup, duration=args.duration, seed=seed,
                                 counters=lambda: counters(client, replica_urls))


def summarize(name: str, windows: list[dict]) -> dict:
    """serve_load's row (throughput, p50/p99, hit ratio, swaps/s...) named after the fleet."""
    from bench.serve_load import summarize as level_row

    row = level_row(0, windows)
    del row["tasks"]
    return {"fleet": name, **row}


def table(rows: list[dict]) -> str:
    from bench.common import markdown_table

    first = rows[0]["throughput"]
    return markdown_table(
        ["fleet", "requests", "images/s", "vs 1 replica", "images/s per round", "p50 ms", "p99 ms",
         "cache hit", "swaps/s", "mean batch", "errors"],
        [[r["fleet"], r["requests"], f"{r['throughput']:.1f}", f"{r['throughput'] / first:.2f}",
          " / ".join(f"{x:.1f}" for x in r["round_throughputs"]), f"{r['p50_ms']:.1f}",
          f"{r['p99_ms']:.1f}", f"{r['hit_ratio']:.3f}", f"{r['swaps_s']:.1f}",
          f"{r['mean_batch']:.1f}", r["errors"]] for r in rows])


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="uda-tiny-vit", help="base model (seeded random weights)")
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--cache-tasks", type=int, default=200, help="residuals each replica's cache holds")
    p.add_argument("--concurrency", type=int, default=12, help="closed-loop clients")
    p.add_argument("--warmup", type=float, default=15.0, help="unmeasured seconds per fleet and round")
    p.add_argument("--duration", type=float, default=35.0, help="measured seconds per fleet and round")
    p.add_argument("--rounds", type=int, default=2, help="times each fleet is measured, fleets taking turns")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--density", type=float, default=0.003, help="fraction of encoder weights per residual")
    p.add_argument("--out", type=Path, default=None, help="JSON folder (default: bench/results)")
    args = p.parse_args(argv)
    if args.tasks < 3 or not 0 < args.cache_tasks or args.rounds < 1 or args.duration <= 0:
        p.error("--tasks >= 3, --cache-tasks > 0, --rounds >= 1 and --duration > 0")
    args.haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not args.haproxy:
        p.error("haproxy is not installed: run scripts/ensure-haproxy.sh (Debian's package)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench import common
    from bench.serve_load import publish_tasks
    from server.synthetic import image_bytes

    image = image_bytes(0, size=224)
    windows: dict[str, list[dict]] = {name: [] for name, _, _ in FLEETS}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        print(f"publishing {args.tasks} residuals of {args.model}...", file=sys.stderr, flush=True)
        tasks = publish_tasks(store, args.model, args.tasks, args.density, variants=4)
        per_task = residual_cache_bytes(args.model, store, tasks[0])
        cache_bytes = int(args.cache_tasks * per_task * 1.02)
        for r in range(args.rounds):
            for name, n, balance in FLEETS:
                procs, proxy_url, replica_urls = start_fleet(args, store, n, balance, Path(tmp), cache_bytes)
                try:
                    w = asyncio.run(measure(args, proxy_url, replica_urls, procs, tasks, image, seed=r))
                finally:
                    stop_all(procs)
                windows[name].append(w)
                print(f"  round {r + 1}/{args.rounds} {name}: {len(w['latencies']) / w['elapsed']:.1f} images/s",
                      file=sys.stderr, flush=True)
    rows = [summarize(name, windows[name]) for name, _, _ in FLEETS]
    print(f"bench.fleet: {args.model} (random weights), {args.tasks} tasks Zipf(1.0), "
          f"--cache-bytes {cache_bytes} ({args.cache_tasks} residuals of {per_task} B) per replica, "
          f"{args.concurrency} closed-loop clients through haproxy, {args.rounds} x {args.duration:g} s "
          f"per fleet after {args.warmup:g} s warm-up, {os.cpu_count()} CPUs\n")
    print(table(rows))
    common.write_json(common.result_path(args.out or common.RESULTS_DIR, "fleet"),
                      {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "machine": common.machine_info(torch.device("cpu")), "rows": rows,
                       "cache_bytes": cache_bytes, "residual_bytes": per_task})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
