"""Scale of tasks: server memory and residual cold-load latency at 10, 100 and 1,000 tasks.

    python -m bench.scale            # ViT-B-16 (random weights), 0.1% and 0.5% residuals
    python -m bench.scale --quick    # uda-tiny-vit, 5 and 20 tasks at 0.5%: seconds (the smoke test)

Random residuals (valid uda-residual/1 files, `make_residual` + `to_bytes`) are published to a
directory store in a temporary folder and to Redis under a unique key prefix that is deleted
afterwards. Redis holds at most --redis-max-tasks tasks (default 100: 1,000 residuals of 0.5% of
ViT-B-16 would be 3.4 GB in a shared Redis). Then, per store, a fresh process (so its RSS is
only the server's) builds the base as the server does (SwapEngine.setup) and loads every task
the way the server's loader does, keeping each one resident as a flat (index, value) pair plus
its head: get -> sha256 -> from_bytes -> check_compatible -> pack -> build_head. Each load
is timed by stage; the RSS (and device memory) is read after 10, 100, 1,000 resident tasks.
Loads are cold for the server (nothing cached) but the directory's files were just written,
so they come from the OS page cache.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench import common
from bench.lite import float_list, int_list
from residual_store.errors import BaseModelError, StoreUnavailable

logger = logging.getLogger(__name__)

STAGES = ("get", "sha256", "from_bytes", "check_compatible", "pack", "build_head")


@dataclasses.dataclass
class ScaleConfig:
    """What one run measures."""

    model: str = "ViT-B-16"  # open_clip model name of the base (random init)
    device: str = "cpu"  # where the child server keeps the base and the residuals
    tasks: tuple[int, ...] = (10, 100, 1000)  # resident-task checkpoints, ascending
    densities: tuple[float, ...] = (0.001, 0.005)  # fractions of encoder weights per residual
    redis_url: str | None = "redis://127.0.0.1:6379/0"  # None: directory store only
    redis_max_tasks: int = 100  # cap on tasks published to Redis (its memory is shared)
    in_process: bool = False  # load in this process (smoke test: saves two interpreter starts; RSS then
    # includes the publisher's memory, so only a separate process gives the server's RSS)
    seed: int = 0  # residual contents

    def validate(self) -> None:
        """Raise ValueError listing every problem at once."""
        problems = []
        if not self.tasks or min(self.tasks) < 1 or list(self.tasks) != sorted(set(self.tasks)):
            problems.append(f"--tasks {self.tasks}: need ascending distinct counts >= 1")
        if not self.densities or not all(0 < d <= 1 for d in self.densities):
            problems.append(f"--densities {self.densities}: each must be in (0, 1]")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://")):
            problems.append(f"--redis-url {self.redis_url!r}: use redis://host:6379/0, or --no-redis")
        if self.redis_max_tasks < 1:
            problems.append(f"--redis-max-tasks {self.redis_max_tasks}: must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


# -- child: the server-side view -------------------------------------------------------------

def load_all(store_url: str, model: str, device: str, checkpoints: Sequence[int]) -> dict:
    """In a fresh process: base as the server builds it, then every task loaded and kept."""
    import torch

    from residual_store import BaseSpec, check_compatible, from_bytes
    from residual_store.stores import open_store
    from server.cache import resident_form
    from server.engine import SwapEngine

    engine = SwapEngine(BaseSpec(model), device)
    engine.setup()
    store = open_store(store_url)
    dtype = engine.flat.buffer.dtype
    tasks = sorted(store.current_versions().items())
    base_rss, base_dev = common.rss_bytes(), common.device_bytes(engine.device)
    resident, points, times = [], [], {s: [] for s in STAGES}
    for i, (task, (version, sha)) in enumerate(tasks, start=1):
        t = [time.perf_counter()]
        _, blob = store.get(task, version)
        t.append(time.perf_counter())
        if hashlib.sha256(blob).hexdigest() != sha:
            raise RuntimeError(f"{task}: blob sha256 differs from the store's")
        t.append(time.perf_counter())
        residual = from_bytes(blob)
        t.append(time.perf_counter())
        check_compatible(residual, engine.layout, engine.fingerprint, engine.embed_dim)
        t.append(time.perf_counter())
        flat = resident_form(residual, engine.layout, dtype).to(engine.device)
        common.sync(engine.device)
        t.append(time.perf_counter())
        head = residual.build_head().to(engine.device)
        common.sync(engine.device)
        t.append(time.perf_counter())
        for stage, a, b in zip(STAGES, t, t[1:]):
            times[stage].append(b - a)
        resident.append((flat, head, len(blob)))
        del residual, blob
        if i in checkpoints or i == len(tasks):
            points.append({"tasks": i, "rss": common.rss_bytes(), "device": common.device_bytes(engine.device),
                           "flat_bytes": sum(f.nbytes for f, _, _ in resident),
                           "head_bytes": sum(common.module_nbytes(h) for _, h, _ in resident)})
    total = [sum(times[s][k] for s in STAGES) for k in range(len(tasks))]
    return {"base_rss": base_rss, "base_device": base_dev, "points": points, "stage_s": times,
            "load_s": total, "blob_bytes": [b for _, _, b in resident], "device": str(engine.device),
            "torch_threads": torch.get_num_threads()}


def run_child(store_url: str, cfg: ScaleConfig) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", "--child", store_url, "--model", cfg.model,
           "--device", cfg.device, "--tasks", ",".join(map(str, cfg.tasks)), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loader process failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- parent: publish, measure, clean up -------------------------------------------------------

def publish_all(stores: dict, caps: dict, n: int, density: float, engine_facts: dict, seed: int) -> dict:
    from residual_store import to_bytes

    publish_s = {name: [] for name in stores}
    for i in range(n):
        residual = common.random_residual(
            engine_facts["layout"], task=f"task{i:04d}", density=density,
            base_model=engine_facts["model"], base_pretrained=engine_facts["pretrained"],
            base_fingerprint=engine_facts["fingerprint"], dim=engine_facts["dim"], seed=seed * 100_003 + i)
        blob = to_bytes(residual)
        for name, store in stores.items():
            if i < caps[name]:
                t0 = time.perf_counter()
                store.publish(residual.task, blob)
                publish_s[name].append(time.perf_counter() - t0)
        if (i + 1) % 100 == 0:
            logger.info("published %d/%d residuals at density %g", i + 1, n, density)
    return publish_s


def redis_used_memory(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url.split("?")[0]).info("memory")["used_memory"])


def delete_prefix(url: str, prefix: str) -> int:
    """Remove every key under our unique prefix (and nothing else)."""
    import redis

    client = redis.Redis.from_url(url.split("?")[0])
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for k in range(0, len(keys), 500):
        client.delete(*keys[k:k + 500])
    return len(keys)


def summarize_child(child: dict, backend: str, density: float, publish_s: list[float]) -> list[dict]:
    rows = []
    loads = child["load_s"]
    for point in child["points"]:
        n = point["tasks"]
        rows.append({
            "density": density, "backend": backend, "tasks": n,
            "blob_bytes_median": common.median(child["blob_bytes"][:n]),
            "rss": point["rss"], "rss_over_base": point["rss"] - child["base_rss"],
            "rss_per_task": (point["rss"] - child["base_rss"]) / n,
            "device_over_base": point["device"] - child["base_device"],
            "tensor_bytes_per_task": (point["flat_bytes"] + point["head_bytes"]) / n,
            "cold_load_p50_ms": 1e3 * common.median(loads[:n]),
            "cold_load_p99_ms": 1e3 * common.percentile(loads[:n], 99),
            "stage_p50_ms": {s: 1e3 * common.median(child["stage_s"][s][:n]) for s in STAGES},
            "publish_p50_ms": 1e3 * common.median(publish_s[:n]),
        })
    return rows


def run(cfg: ScaleConfig, checkpoint=None) -> dict:
    """Every density of the config; `checkpoint(payload)` is called after each one."""
    from residual_store import BaseSpec
    from residual_store.stores import open_store
    from server.cache import resident_form
    from server.engine import SwapEngine

    engine = SwapEngine(BaseSpec(cfg.model), "cpu")  # only for layout and fingerprint
    engine.setup()
    facts = {"layout": engine.layout, "model": engine.spec.model, "pretrained": engine.spec.pretrained_label,
             "fingerprint": engine.fingerprint, "dim": engine.embed_dim}
    numel = engine.layout.numel
    del engine
    rows, redis_memory, children, directory_bytes, prefixes = [], {}, {}, {}, []

    def payload() -> dict:
        return {"scenario": "scale", "config": dataclasses.asdict(cfg),
                "machine": common.machine_info(__import__("torch").device(cfg.device)),
                "encoder_params": numel, "rows": rows, "redis_memory": redis_memory,
                "children": children, "directory_bytes": directory_bytes, "redis_prefixes": prefixes}

    n = max(cfg.tasks)
    for density in cfg.densities:
        with tempfile.TemporaryDirectory(prefix="uda-bench-scale-") as tmp:
            stores, caps, prefix = {"directory": open_store(tmp)}, {"directory": n}, None
            if cfg.redis_url:
                prefix = f"uda-bench-{uuid.uuid4().hex[:12]}:"
                prefixes.append(prefix)
                stores["redis"] = open_store(cfg.redis_url, prefix=prefix)
                try:
                    stores["redis"].ping()
                except StoreUnavailable as e:
                    raise BaseModelError(f"Redis at {cfg.redis_url} does not answer ({e}): start it "
                                         "or pass --no-redis") from e
                caps["redis"] = min(n, cfg.redis_max_tasks)
                used0 = redis_used_memory(cfg.redis_url)
            try:
                publish_s = publish_all(stores, caps, n, density, facts, cfg.seed)
                if prefix:
                    redis_memory[str(density)] = {"tasks": caps["redis"],
                                                  "used_memory_delta": redis_used_memory(cfg.redis_url) - used0}
                disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
                for name, store in stores.items():
                    url = tmp if name == "directory" else f"{cfg.redis_url}?prefix={prefix}"
                    logger.info("loading %d tasks from the %s store (density %g)", caps[name], name, density)
                    child = (load_all(url, cfg.model, cfg.device, cfg.tasks) if cfg.in_process
                             else run_child(url, cfg))
                    children[f"{name}@{density}"] = child
                    rows += summarize_child(child, name, density, publish_s[name])
                directory_bytes[str(density)] = disk
                if checkpoint is not None:
                    checkpoint(payload())
            finally:
                if prefix:
                    removed = delete_prefix(cfg.redis_url, prefix)
                    logger.info("deleted %d Redis keys under %s", removed, prefix)
    return payload()


def table(payload: dict) -> str:
    headers = ["density", "store", "tasks", "blob (median)", "server RSS", "RSS over base",
               "RSS / task", "tensors / task", "device mem over base", "cold load p50 ms",
               "cold load p99 ms", "stages p50 ms (get/sha/parse/check/pack/head)"]
    body = []
    for r in payload["rows"]:
        st = r["stage_p50_ms"]
        body.append([f"{r['density']:.1%}", r["backend"], r["tasks"], common.fmt_bytes(r["blob_bytes_median"]),
                     common.fmt_bytes(r["rss"]), common.fmt_bytes(r["rss_over_base"]),
                     common.fmt_bytes(r["rss_per_task"]), common.fmt_bytes(r["tensor_bytes_per_task"]),
                     common.fmt_bytes(r["device_over_base"]), f"{r['cold_load_p50_ms']:.1f}",
                     f"{r['cold_load_p99_ms']:.1f}", "/".join(f"{st[s]:.1f}" for s in STAGES)])
    lines = [common.markdown_table(headers, body)]
    for density, size in payload["directory_bytes"].items():
        lines.append(f"directory store on disk: {common.fmt_bytes(size)} for {max(payload['config']['tasks'])} "
                     f"tasks at density {float(density):.1%}")
    for density, mem in payload["redis_memory"].items():
        lines.append(f"Redis used_memory grew by {common.fmt_bytes(mem['used_memory_delta'])} for "
                     f"{mem['tasks']} tasks at density {float(density):.1%} (keys deleted afterwards)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    d = ScaleConfig()
    p.add_argument("--quick", action="store_true", help="uda-tiny-vit, 5 and 20 tasks, density 0.5%% only, --in-process (smoke test)")
    p.add_argument("--model", default=None, help=f"default: {d.model}")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--tasks", type=int_list, default=None, help="checkpoints (default: 10,100,1000)")
    p.add_argument("--densities", type=float_list, default=None, help="default: 0.001,0.005 (--quick: 0.005)")
    p.add_argument("--redis-url", default=d.redis_url, help="default: %(default)s")
    p.add_argument("--no-redis", action="store_true", help="directory store only")
    p.add_argument("--redis-max-tasks", type=int, default=d.redis_max_tasks, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="JSON folder (default: bench/results)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--quick: 1)")
    p.add_argument("--in-process", action="store_true",
                   help="load in this process, not a fresh one (RSS not the server's alone; --quick sets it)")
    p.add_argument("--child", metavar="STORE_URL", help=argparse.SUPPRESS)  # internal: the loader process
    args = p.parse_args(argv)
    common.setup_logging(args.quiet)
    common.set_threads(args.threads if args.threads is not None else (1 if args.quick else None))
    model = args.model or ("uda-tiny-vit" if args.quick else d.model)
    tasks = args.tasks or ((5, 20) if args.quick else d.tasks)
    if args.child:
        print(json.dumps(load_all(args.child, model, args.device, tasks)))
        return 0
    densities = args.densities or ((0.005,) if args.quick else d.densities)
    cfg = ScaleConfig(model=model, device=args.device, tasks=tasks, densities=densities,
                      redis_url=None if args.no_redis else args.redis_url,
                      redis_max_tasks=args.redis_max_tasks, seed=args.seed,
                      in_process=args.in_process or args.quick)
    path = common.result_path(args.out, "scale")
    try:
        cfg.validate()
        payload = run(cfg, checkpoint=lambda partial: common.write_json(path, partial))
    except (ValueError, BaseModelError, RuntimeError) as e:
        print(f"bench.scale: error: {e}", file=sys.stderr)
        return 2
    print(f"Scale: {cfg.model} base ({payload['encoder_params'] / 1e6:.1f} M encoder weights, random init) "
          f"served on {cfg.device}; every published task loaded and kept resident (packed flat index + values + "
          f"head); Redis capped at {cfg.redis_max_tasks} tasks"
          + ("; loaded IN-PROCESS: the RSS includes the publisher's memory" if cfg.in_process else ""))
    print(common.machine_line(payload["machine"]))
    print(table(payload))
    common.write_json(path, payload)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
