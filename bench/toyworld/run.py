"""The paper's table in miniature: every transfer task of the toy world through the real `uda-train`.

    python -m bench.toyworld.run                      # the full run (about an hour on 2 CPU cores)
    python -m bench.toyworld.run --tasks photo2sketch --seeds 0 --epochs 1   # a taste

Steps: write the world (bench/toyworld/world.py), pre-train or reuse the teacher
(bench/toyworld/teacher.py), then for each task SOURCE2TARGET between the domains run
`uda-train` once per method and seed:

    zeroshot        --method zeroshot                (trains nothing; seed-independent)
    baseline        --method baseline                (source only)
    cmkd            --method cmkd
    cmkd+rst        --method cmkd --rst
    cmkd+fixmatch   --method cmkd --fixmatch

Each run has its own workdir (named by its flags, so a finished run is reused when the
runner is started again); its report.json gives the target accuracy (measured by uda-train
on the exported residual), DSP and the fraction of encoder weights changed, and its
train_log.jsonl the per-step losses. The runner prints the table (mean over seeds, with the
spread when there are several) and writes every number to WORKDIR/results.json and the table
to WORKDIR/table.md.

Runs go to `uda-train` subprocesses (`--jobs` at a time, each with `--threads` torch threads:
on a small CPU two single-threaded runs beat one two-threaded one) or, with --jobs 0, to
trainer.cli.main in this process.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.toyworld import teacher as teacher_mod
from bench.toyworld import world

logger = logging.getLogger(__name__)

METHODS: dict[str, tuple[str, ...]] = {
    "zeroshot": ("--method", "zeroshot"),
    "baseline": ("--method", "baseline"),
    "cmkd": ("--method", "cmkd"),
    "cmkd+rst": ("--method", "cmkd", "--rst"),
    "cmkd+fixmatch": ("--method", "cmkd", "--fixmatch"),
}
ABBREV = {"photo": "P", "sketch": "S", "clipart": "C"}
ALL_TASKS = tuple(f"{s}2{t}" for s in world.DOMAINS for t in world.DOMAINS if s != t)


@dataclasses.dataclass
class RunConfig:
    """One benchmark; the defaults are the full run of RESULTS.md."""

    workdir: Path = Path("runs/toyworld")  # world, teacher, one folder per uda-train run, results
    tasks: tuple[str, ...] = ALL_TASKS  # SOURCE2TARGET between world.DOMAINS
    methods: tuple[str, ...] = tuple(METHODS)  # rows of the table
    seeds: tuple[int, ...] = (0, 1)  # uda-train --seed values; the table shows their mean
    per_class: int = 60  # images per class per domain
    epochs: int = 4  # uda-train --epochs
    iters_per_epoch: int = 100  # uda-train --iters-per-epoch
    batch_size: int = 32  # uda-train --batch-size (images per domain per step)
    lr: float | None = None  # uda-train --lr; None: the trainer's family default (the toy teacher is a ResNet: 3e-7)
    head_lr_mult: float | None = None  # uda-train --head-lr-mult; None: family default (ViT 1000)
    tau: float | None = None  # uda-train --tau for RST; None: family default (ViT 1e-6)
    extra: tuple[str, ...] = ()  # more uda-train flags, passed to every trained run
    teacher_quick: bool = False  # pre-train the teacher with teacher.QUICK settings
    teacher_steps: int | None = None  # override the teacher's optimiser steps
    jobs: int = 2  # uda-train subprocesses at a time; 0: call trainer.cli.main in this process
    threads: int = 1  # torch threads per uda-train run (OMP_NUM_THREADS; set in-process too)
    publish: str | None = None  # store URL every run publishes to (task names TASK-METHOD-sSEED)
    fresh: bool = False  # rerun even when a run's workdir already holds its report

    def validate(self) -> None:
        problems = []
        bad = [t for t in self.tasks if t not in ALL_TASKS]
        if bad:
            problems.append(f"unknown tasks {bad}: expected some of {', '.join(ALL_TASKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            problems.append(f"unknown methods {bad}: expected some of {', '.join(METHODS)}")
        if not self.seeds:
            problems.append("no seeds given")
        for name in ("per_class", "epochs", "iters_per_epoch", "batch_size", "threads"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range: expected >= 1")
        if self.jobs < 0:
            problems.append(f"--jobs {self.jobs} is out of range: expected >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def world_dir(self) -> Path:
        return Path(self.workdir) / "world"

    @property
    def teacher_path(self) -> Path:
        return Path(self.workdir) / "toyclip.safetensors"


@dataclasses.dataclass
class Job:
    """One uda-train run."""

    task: str
    method: str
    seed: int | None  # None for zeroshot (nothing random happens)
    argv: list[str]  # uda-train flags, --workdir last
    workdir: Path


@dataclasses.dataclass
class Outcome:
    job: Job
    report: dict | None  # report.json, None when the run failed
    error: str | None
    reused: bool


def split_task(task: str) -> tuple[str, str]:
    source, target = task.split("2")
    return source, target


def task_label(task: str) -> str:
    source, target = split_task(task)
    return f"{ABBREV.get(source, source)}→{ABBREV.get(target, target)}"


def plan(cfg: RunConfig) -> list[Job]:
    """Every uda-train run of the benchmark, in the order they start."""
    jobs = []
    for task in cfg.tasks:
        source, target = split_task(task)
        for method in cfg.methods:
            seeds: Sequence[int | None] = [None] if method == "zeroshot" else cfg.seeds
            for seed in seeds:
                argv = ["--data-root", str(cfg.world_dir), "--source-domain", source,
                        "--target-domain", target, "--model", str(teacher_mod.MODEL_CONFIG),
                        "--pretrained", str(cfg.teacher_path), *METHODS[method],
                        "--device", "cpu", "--workers", "0"]
                if method != "zeroshot":
                    argv += ["--seed", str(seed), "--epochs", str(cfg.epochs),
                             "--iters-per-epoch", str(cfg.iters_per_epoch),
                             "--batch-size", str(cfg.batch_size), *cfg.extra]
                    for flag, value in (("--lr", cfg.lr), ("--head-lr-mult", cfg.head_lr_mult)):
                        if value is not None:
                            argv += [flag, repr(value)]
                    if cfg.tau is not None and "--rst" in argv:
                        argv += ["--tau", repr(cfg.tau)]
                name = f"{task}-{method.replace('+', '-')}" + ("" if seed is None else f"-s{seed}")
                if cfg.publish:
                    argv += ["--publish", cfg.publish, "--task", name]
                digest = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:10]
                workdir = Path(cfg.workdir) / "runs" / f"{name}-{digest}"
                jobs.append(Job(task, method, seed, argv + ["--workdir", str(workdir)], workdir))
    return jobs


def execute(job: Job, cfg: RunConfig) -> Outcome:
    report_path = job.workdir / "report.json"
    if report_path.is_file() and not cfg.fresh:
        return Outcome(job, json.loads(report_path.read_text()), None, True)
    report_path.unlink(missing_ok=True)
    job.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.jobs == 0:
        from bench.common import threads_set
        from trainer import cli

        # --threads holds in-process too: torch's default (every core) slows a 32-pixel model
        # down ten-fold on a machine that other work shares (threads spin waiting on each other).
        with threads_set(cfg.threads):
            code = cli.main([*job.argv, "--overwrite"])
        error = None if code == 0 else f"uda-train exited with {code}"
    else:
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
        with open(job.workdir / "uda-train.out", "w") as out:
            # a rerun (--fresh, or a run killed half-way) replaces what its workdir holds
            proc = subprocess.run([sys.executable, "-m", "trainer.cli", *job.argv, "--overwrite"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, check=False)
        error = None if proc.returncode == 0 else (
            f"uda-train exited with {proc.returncode}: {_last_line(job.workdir / 'uda-train.out')}")
    logger.info("%s %s seed %s: %.0fs%s", job.task, job.method, job.seed,
                time.perf_counter() - started, f" ({error})" if error else "")
    if error is None and not report_path.is_file():
        error = "uda-train wrote no report.json"
    return Outcome(job, json.loads(report_path.read_text()) if error is None else None, error, False)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def source_loss(workdir: Path, window: int = 10) -> tuple[float, float] | None:
    """Mean L_cls over the first and the last `window` steps of a run's train_log.jsonl."""
    path = workdir / "train_log.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r["cls"] for r in records if "cls" in r]  # --eval-every lines carry no losses
    if not values:
        return None
    w = max(1, min(window, len(values) // 2))
    return statistics.fmean(values[:w]), statistics.fmean(values[-w:])


def run_all(cfg: RunConfig, progress=print) -> list[Outcome]:
    jobs = plan(cfg)
    done: list[Outcome] = []

    def one(job: Job) -> Outcome:
        outcome = execute(job, cfg)
        done.append(outcome)
        acc = outcome.report["metrics"]["target_accuracy"] if outcome.report else None
        progress(f"[{len(done)}/{len(jobs)}] {job.task} {job.method}"
                 + ("" if job.seed is None else f" seed {job.seed}")
                 + (f": {100 * acc:.1f}%" if acc is not None else f": FAILED {outcome.error}")
                 + (" (reused)" if outcome.reused else ""))
        return outcome

    if cfg.jobs <= 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        return list(pool.map(one, jobs))


# -- the table -----------------------------------------------------------------------------------

def summarise(outcomes: Sequence[Outcome], cfg: RunConfig) -> dict:
    """Per method and task: accuracies over seeds, mean, spread; per method: average, DSP."""
    table: dict[str, dict] = {}
    for method in cfg.methods:
        row: dict = {"tasks": {}, "failed": []}
        for task in cfg.tasks:
            runs = [o for o in outcomes if o.job.method == method and o.job.task == task]
            ok = [o.report["metrics"] for o in runs if o.report]
            row["failed"] += [f"{task} seed {o.job.seed}: {o.error}" for o in runs if not o.report]
            if not ok:
                continue
            accs = [m["target_accuracy"] for m in ok]
            row["tasks"][task] = {
                "accuracy": accs, "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "dsp": statistics.fmean(m["dsp"] for m in ok),
                "nnz": statistics.fmean(m["nnz"] for m in ok),
                "fraction_changed": statistics.fmean(m["fraction_changed"] for m in ok),
            }
        cells = row["tasks"].values()
        if len(row["tasks"]) == len(cfg.tasks):
            row["average"] = statistics.fmean(c["mean"] for c in cells)
            # Seed-wise averages over tasks give the spread of the average itself.
            per_seed = [statistics.fmean(c["accuracy"][i] for c in cells)
                        for i in range(min(len(c["accuracy"]) for c in cells))]
            row["average_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            row["dsp_total"] = sum(c["dsp"] for c in cells)
            row["fraction_changed"] = statistics.fmean(c["fraction_changed"] for c in cells)
        table[method] = row
    return table


def format_table(table: dict, cfg: RunConfig) -> str:
    """Markdown: one row per method, one column per task, then the average and DSP."""
    head = ["method", *(task_label(t) for t in cfg.tasks), "avg", "DSP (all tasks)", "encoder changed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        cells = [method]
        for task in cfg.tasks:
            c = row["tasks"].get(task)
            cells.append("fail" if c is None else _pct(c["mean"], c["std"]))
        if "average" in row:
            cells += [_pct(row["average"], row["average_std"]), _count(row["dsp_total"]),
                      f"{100 * row['fraction_changed']:.2f}%"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}" + (f" ±{100 * std:.1f}" if std else "")


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return f"{n:.0f}"


def teacher_config(cfg: RunConfig) -> teacher_mod.TeacherConfig:
    values = dict(teacher_mod.QUICK) if cfg.teacher_quick else {}
    if cfg.teacher_steps is not None:
        values["steps"] = cfg.teacher_steps
    return teacher_mod.TeacherConfig(out=cfg.teacher_path, **values)


def benchmark(cfg: RunConfig, progress=print) -> dict:
    """World, teacher, every run, the table; returns what results.json holds."""
    cfg.validate()
    started = time.perf_counter()
    domains = tuple(sorted({d for t in cfg.tasks for d in split_task(t)}, key=world.DOMAINS.index))
    world.write_world(world.WorldConfig(cfg.world_dir, domains, cfg.per_class))
    progress(f"world: {', '.join(domains)} x {len(world.CLASSES)} classes x {cfg.per_class} images "
             f"in {cfg.world_dir}")
    sidecar = teacher_mod.ensure_teacher(teacher_config(cfg), cfg.world_dir, domains)
    progress(f"teacher: {cfg.teacher_path} (pre-trained in {sidecar['pretrain_seconds']}s); "
             "zero-shot " + ", ".join(f"{d} {100 * a:.1f}%" for d, a in sidecar["zero_shot"].items()))
    outcomes = run_all(cfg, progress)
    table = summarise(outcomes, cfg)
    runs = []
    for o in outcomes:
        losses = source_loss(o.job.workdir)
        runs.append({"task": o.job.task, "method": o.job.method, "seed": o.job.seed,
                     "workdir": str(o.job.workdir), "argv": o.job.argv, "error": o.error,
                     "metrics": o.report["metrics"] if o.report else None,
                     "source_loss_first_last": losses, "reused": o.reused})
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
               "teacher": {k: sidecar[k] for k in ("checkpoint", "pretrain_seconds", "zero_shot", "prompt")},
               "table": table, "markdown": format_table(table, cfg), "runs": runs,
               "seconds": round(time.perf_counter() - started, 1)}
    out = Path(cfg.workdir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(results["markdown"] + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.run",
                                description="Run every transfer task of the toy world through "
                                            "uda-train and print the paper-style table.")
    p.add_argument("--workdir", type=Path, default=d.workdir, help="default: %(default)s")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks), help=f"default: {' '.join(ALL_TASKS)}")
    p.add_argument("--methods", nargs="+", default=list(d.methods), help=f"default: {' '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="default: %(default)s")
    p.add_argument("--per-class", type=int, default=d.per_class, help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--iters-per-epoch", type=int, default=d.iters_per_epoch, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--lr", type=float, help="uda-train --lr (default: the trainer's; the toy teacher is a ResNet: 3e-7)")
    p.add_argument("--head-lr-mult", type=float, help="uda-train --head-lr-mult (default: the trainer's)")
    p.add_argument("--tau", type=float, help="uda-train --tau for RST (default: the trainer's)")
    p.add_argument("--extra", default="", help="more uda-train flags, e.g. \"--ramp-max-steps 10000\"")
    p.add_argument("--teacher-quick", action="store_true", help="pre-train a quick teacher (tests)")
    p.add_argument("--teacher-steps", type=int, help="override the teacher's optimiser steps")
    p.add_argument("--jobs", type=int, default=d.jobs, help="parallel uda-train processes; 0: in-process")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--publish", metavar="STORE_URL", help="publish every run to this store")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose reports already exist")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="toyworld: %(levelname)s: %(message)s")
    values = {k: v for k, v in vars(args).items() if k != "verbose"}
    values.update(tasks=tuple(args.tasks), methods=tuple(args.methods), seeds=tuple(args.seeds),
                  extra=tuple(args.extra.split()))
    cfg = RunConfig(**values)
    try:
        results = benchmark(cfg)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"toyworld: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print()
    print(results["markdown"])
    failed = [f for row in results["table"].values() for f in row["failed"]]
    for f in failed:
        print(f"failed: {f}", file=sys.stderr)
    print(f"\nresults: {Path(cfg.workdir) / 'results.json'} ({results['seconds'] / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
