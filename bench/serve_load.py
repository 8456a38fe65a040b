"""Closed-loop load on a live uda-serve: N tasks with Zipf(1.0) popularity.

    python -m bench.serve_load --quick                       # uda-tiny-vit, N = 1, 10, 100; ~1 minute
    python -m bench.serve_load --model ViT-B-16 --tasks 1,10,100,500
    python -m bench.serve_load --streams 1,2                 # one server per setting, side by side
    python -m bench.serve_load --precision fp32,bf16 --tasks 1,10   # uda-serve --precision, side by side
    python -m bench.serve_load --url http://host:8000 --tasks 1,10   # a server you started

Without --url, a directory store with max(N) random residuals of the base (seeded random
weights; timing does not depend on the weights) is written to a temporary folder and
`uda-serve` is started on it as a subprocess. Each N level sends requests for the first N
tasks only, `--concurrency` clients each waiting for its answer before sending the next
(closed loop), for --warmup then --duration seconds; the levels take turns for --rounds rounds
(1, 10, 100, 500, 1, 10, ...), so a drift of the machine's speed during the run weighs on every
level alike instead of on the last ones. The server preloads every task (steady
state of a long-running server whose --cache-bytes fits them); --cold leaves the loads to the
first requests. Reported per N: p50/p99 latency,
throughput (images/s), swaps/s and cache hit ratio read from /metrics, and throughput
relative to N = 1. With several --streams or --precision settings one server per setting runs
the same levels, one after another, and a last table sets their throughputs side by side. A
bf16 server is started with --max-precision-drop inf: these random residuals have no recorded
accuracy, and the guard would refuse them. Paste the printed tables into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.lite import closed_loop, free_port

_METRICS = ("uda_residual_cache_hits_total", "uda_residual_cache_misses_total",
            "uda_swap_duration_seconds_count", "uda_swap_duration_seconds_sum",
            "uda_batch_size_count", "uda_batch_size_sum")


def publish_tasks(store_dir: Path, model: str, n: int, density: float, variants: int) -> list[str]:
    """n residuals of `model` (seeded random base) in a directory store; task names T000..."""
    import torch

    from residual_store import BaseSpec, TaskHead, embed_dim, fingerprint, make_residual, to_bytes
    from residual_store.stores import open_store

    base = BaseSpec(model).build()
    fp, dim = fingerprint(base.visual), embed_dim(base)
    g = torch.Generator().manual_seed(0)
    pool = []  # sparse deltas are shared by variant; heads and names make every task distinct
    for _ in range(variants):
        deltas = {}
        for name, p in base.visual.named_parameters():
            k = int(p.numel() * density)
            if k:
                idx = torch.unique(torch.randint(p.numel(), (k,), generator=g))
                deltas[name] = (idx, torch.randn(idx.numel(), generator=g) * 1e-3)
        pool.append(deltas)
    store = open_store(str(store_dir))
    names = [f"T{i:03d}" for i in range(n)]
    for i, task in enumerate(names):
        head = TaskHead(dim, 10)
        residual = make_residual(pool[i % variants], head.eval(), task=task,
                                 classes=[f"c{j}" for j in range(10)], base_model=model,
                                 base_pretrained="random", base_fingerprint=fp)
        store.publish(task, to_bytes(residual))
    return names


def start_server(args, store_dir: Path, port: int, tasks: list[str], setting: tuple[int, str]
                 ) -> subprocess.Popen:
    streams, precision = setting
    # --pretrained random: the residuals above are made on BaseSpec(model)'s seeded random weights
    cmd = [sys.executable, "-m", "server.cli", "--model", args.model, "--pretrained", "random",
           "--store", str(store_dir), "--port", str(port), "--cache-bytes", args.cache_bytes,
           "--max-batch", str(args.max_batch), "--max-queue", "100000", "--log-level", "warning",
           "--device", args.device, "--streams", str(streams), "--precision", precision,
           "--max-precision-drop", "inf"]
    if not args.cold:
        # A server that has been up a while holds every task its cache fits; without this, a
        # 30 s window at a few images/s measures first-touch loads of hundreds of tasks instead.
        cmd += ["--preload", ",".join(tasks)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(client, proc: subprocess.Popen | None, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"uda-serve exited with {proc.returncode} before becoming ready")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("uda-serve did not become ready")


async def scrape(client) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out = {}
    for name in _METRICS:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


async def run_level(client, tasks: list[str], image: bytes, args, seed: int) -> dict:
    """One measured window at one level: raw latencies, errors, metric deltas, seconds."""
    return await closed_loop(client, "", tasks, image, concurrency=args.concurrency,
                             warmup=args.warmup, duration=args.duration, seed=seed,
                             counters=lambda: scrape(client))


def summarize(n_tasks: int, windows: list[dict]) -> dict:
    """One table row from a level's windows (all rounds): totals over the measured seconds."""
    latencies = sorted(x for w in windows for x in w["latencies"])
    elapsed = sum(w["elapsed"] for w in windows)
    d = {k: sum(w["metrics"][k] for w in windows) for k in _METRICS}
    lookups = d["uda_residual_cache_hits_total"] + d["uda_residual_cache_misses_total"]
    swaps = d["uda_swap_duration_seconds_count"]
    return {
        "tasks": n_tasks, "requests": len(latencies), "errors": sum(w["errors"] for w in windows),
        "p50_ms": 1e3 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "throughput": len(latencies) / elapsed,
        "round_throughputs": [len(w["latencies"]) / w["elapsed"] for w in windows],
        "swaps_s": swaps / elapsed,
        "swap_ms": 1e3 * d["uda_swap_duration_seconds_sum"] / swaps if swaps else 0.0,
        "hit_ratio": d["uda_residual_cache_hits_total"] / lookups if lookups else float("nan"),
        "mean_batch": (d["uda_batch_size_sum"] / d["uda_batch_size_count"]
                       if d["uda_batch_size_count"] else 0.0),
    }


def single_task_throughput(rows: list[dict]) -> float | None:
    """images/s of the N = 1 level, the reference of every 'vs 1 task' ratio (None if not run)."""
    return next((r["throughput"] for r in rows if r["tasks"] == 1), None)


def table(rows: list[dict], title: str) -> str:
    single = single_task_throughput(rows)
    lines = [title, "",
             "| tasks | requests | p50 ms | p99 ms | images/s | vs 1 task | swaps/s | ms / swap "
             "| cache hit | mean batch | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['throughput'] / single:.2f}" if single else "-"
        lines.append(f"| {r['tasks']} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput']:.2f} | {ratio} | {r['swaps_s']:.1f} | {r['swap_ms']:.1f} | "
                     f"{r['hit_ratio']:.3f} | {r['mean_batch']:.1f} | {r['errors']} |")
    return "\n".join(lines)


def setting_label(setting: tuple[int, str]) -> str:
    streams, precision = setting
    return f"{streams} stream{'s' * (streams > 1)} {precision}"


def streams_table(results: dict[tuple[int, str], list[dict]]) -> str:
    """images/s per N under each (--streams, --precision) setting, and each against the first."""
    from bench.common import markdown_table

    settings = list(results)
    first = settings[0]
    headers = (["tasks"] + [f"images/s, {setting_label(s)}" for s in settings]
               + [f"vs 1 task, {setting_label(s)}" for s in settings]
               + [f"{setting_label(s)} vs {setting_label(first)}" for s in settings[1:]])
    single = {s: single_task_throughput(results[s]) for s in settings}
    rows = []
    for i, r0 in enumerate(results[first]):
        by = {s: results[s][i]["throughput"] for s in settings}
        rows.append([r0["tasks"]] + [f"{by[s]:.2f}" for s in settings]
                    + [f"{by[s] / single[s]:.2f}" if single[s] else "-" for s in settings]
                    + [f"{by[s] / by[first]:.2f}" if by[first] else "-" for s in settings[1:]])
    return markdown_table(headers, rows)


async def bench(args, url: str, tasks: list[str], proc) -> list[dict]:
    import httpx

    from server.synthetic import image_bytes

    image = image_bytes(0, size=224)
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await wait_ready(client, proc)
        windows: dict[int, list[dict]] = {n: [] for n in args.tasks}
        for r in range(args.rounds):
            for n in args.tasks:
                w = await run_level(client, tasks[:n], image, args, seed=1000 * r + n)
                windows[n].append(w)
                print(f"  round {r + 1}/{args.rounds} N={n}: "
                      f"{len(w['latencies']) / w['elapsed']:.2f} images/s", file=sys.stderr, flush=True)
        return [summarize(n, windows[n]) for n in args.tasks]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="uda-tiny-vit, N = 1,10,100, short runs")
    p.add_argument("--model", default="ViT-B-16", help="base model (seeded random weights)")
    p.add_argument("--tasks", default="1,10,100,500", help="comma-separated N levels")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level and round")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds per level and round")
    p.add_argument("--rounds", type=int, default=2, help="times each level is measured, levels taking turns")
    p.add_argument("--density", type=float, default=0.003, help="fraction of encoder weights per residual")
    p.add_argument("--variants", type=int, default=4, help="distinct sparse patterns among the tasks")
    p.add_argument("--cache-bytes", default="2GiB", help="--cache-bytes of the started server")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--cold", action="store_true",
                   help="start the server without --preload: each task's first request loads it")
    p.add_argument("--device", default="auto")
    p.add_argument("--streams", default="1",
                   help="comma-separated uda-serve --streams settings, one server each (e.g. 1,2)")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated uda-serve --precision settings, one server each (e.g. fp32,bf16)")
    p.add_argument("--out", type=Path, default=None, help="JSON folder (default: bench/results)")
    p.add_argument("--url", default=None, help="bench this running server (tasks must exist) instead")
    p.add_argument("--task-names", default=None, help="with --url: comma-separated task names")
    args = p.parse_args(argv)
    if args.quick:  # shorter defaults; flags given explicitly still win
        for name, value in (("model", "uda-tiny-vit"), ("duration", 5.0), ("warmup", 2.0),
                            ("concurrency", 8), ("tasks", "1,10,100"), ("rounds", 1)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    try:
        args.tasks = sorted({int(x) for x in args.tasks.split(",") if x.strip()})
        args.streams = sorted({int(x) for x in args.streams.split(",") if x.strip()})
    except ValueError:
        p.error(f"--tasks and --streams take comma-separated integers, got {args.tasks!r} and {args.streams!r}")
    if not args.tasks or not args.streams or min(args.tasks) < 1 or min(args.streams) < 1:
        p.error("--tasks and --streams need at least one value, each >= 1")
    args.precision = list(dict.fromkeys(x.strip() for x in args.precision.split(",") if x.strip()))
    if not args.precision or not set(args.precision) <= {"fp32", "bf16"}:
        p.error(f"--precision takes fp32 and/or bf16, comma-separated, got {','.join(args.precision)!r}")
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        tasks = (args.task_names or "").split(",") if args.task_names else []
        if len(tasks) < max(args.tasks):
            print(f"--url needs --task-names with at least {max(args.tasks)} names", file=sys.stderr)
            return 2
        rows = asyncio.run(bench(args, args.url, tasks, None))
        print(table(rows, f"serve_load against {args.url}"))
        return 0

    from bench import common

    results: dict[tuple[int, str], list[dict]] = {}
    rss: dict[tuple[int, str], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"publishing {max(args.tasks)} residuals of {args.model}...", file=sys.stderr, flush=True)
        tasks = publish_tasks(Path(tmp) / "store", args.model, max(args.tasks), args.density, args.variants)
        for setting in [(s, p) for s in args.streams for p in args.precision]:
            print(f"uda-serve --streams {setting[0]} --precision {setting[1]}:", file=sys.stderr, flush=True)
            port = free_port()
            proc = start_server(args, Path(tmp) / "store", port, tasks, setting)
            try:
                results[setting] = asyncio.run(bench(args, f"http://127.0.0.1:{port}", tasks, proc))
                rss[setting] = common.rss_bytes(proc.pid)  # every task resident, after the load
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    for setting, rows in results.items():
        title = (f"serve_load: {args.model} (random weights), --streams {setting[0]} --precision "
                 f"{setting[1]} (server RSS {common.fmt_bytes(rss[setting])}), "
                 f"{args.concurrency} closed-loop clients, Zipf(1.0), "
                 f"{args.rounds} x {args.duration:g} s per level, {os.cpu_count()} CPUs, device {args.device}, "
                 f"{'cold cache' if args.cold else 'tasks preloaded'}")
        print(table(rows, title) + "\n")
    if len(results) > 1:
        print(streams_table(results))
    save(args, results, rss)
    return 0


def save(args, results: dict[tuple[int, str], list[dict]], rss: dict[tuple[int, str], int]) -> None:
    import torch

    from bench import common

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = common.write_json(common.result_path(args.out or common.RESULTS_DIR, "serve_load"),
                             {"args": settings, "machine": common.machine_info(torch.device("cpu")),
                              "settings": {setting_label(s): rows for s, rows in results.items()},
                              "server_rss_bytes": {setting_label(s): n for s, n in rss.items()}})
    print(f"raw results: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
