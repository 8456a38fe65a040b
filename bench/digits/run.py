"""MNIST -> MNIST-M through the real `uda-train`: does CMKD (+ RST) adapt a CLIP on real data?

    python -m bench.digits.run                        # data, teacher, 5 methods x 3 seeds
    python -m bench.digits.run --seeds 0 --methods baseline cmkd   # a taste

Steps: write the domains (bench/digits/data.py), pre-train or reuse the teacher
(bench/digits/teacher.py), then run `uda-train --preset digits` once per method and seed:

    zeroshot        --method zeroshot                (trains nothing; seed-independent)
    baseline        --method baseline                (source only)
    cmkd            --method cmkd
    cmkd+rst        --method cmkd --rst
    cmkd+fixmatch   --method cmkd --fixmatch

The preset brings the authors' digits recipe (64 + 64 images per step, RandomResizedCrop
0.75-1.2, no flip, the digits prompt). What it cannot know is this teacher's size: a 1.3 M
parameter encoder trained for a few hundred steps needs an encoder lr thousands of times the
paper's 3e-7 for RN50, and a tau to match (bench/toyworld/RESULTS.md), so the runner passes
--lr, --head-lr-mult and --tau, and a short run length. A uda-train without --preset gets the
preset's batch size and prompt as flags instead (it keeps its own crop and flip).

Each run has its own workdir, named by its flags, so a finished run is reused when the runner
starts again (`--fresh` reruns). Its report.json gives the target accuracy (measured by
uda-train on the exported residual), the mean per-class accuracy, DSP and the share of encoder
weights changed. The table (mean and spread over seeds) goes to stdout, WORKDIR/table.md and,
with every number, WORKDIR/results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.digits import data
from bench.digits import teacher as teacher_mod
from bench.toyworld.run import METHODS, Job, Outcome, _count, execute, source_loss

logger = logging.getLogger(__name__)

TASK = "mnist2mnistm"
PRESET = "digits"
# What `--preset digits` sets that a flag can say too, for a uda-train that has no --preset.
PRESET_FALLBACK = ("--batch-size", "64", "--prompt", teacher_mod.ZERO_SHOT_PROMPT)
# The goals of issue 17, item 10, checked on every table.
GOAL_GAIN = 10.0  # points CMKD must gain over source-only and over zero-shot
GOAL_RST_DROP = 3.0  # points CMKD+RST may lose against CMKD
GOAL_RST_CHANGED = 0.03  # share of encoder weights CMKD+RST may change


@dataclasses.dataclass
class RunConfig:
    """One benchmark; the defaults are the full run of RESULTS.md."""

    workdir: Path = Path("runs/digits")  # data, teacher, one folder per uda-train run, results
    methods: tuple[str, ...] = tuple(METHODS)  # rows of the table
    seeds: tuple[int, ...] = (0, 1, 2)  # uda-train --seed values; the table shows their mean
    per_class: int = 250  # images per class per domain (at most 250)
    data_seed: int = 0  # the source/target split and the MNIST-M patches
    epochs: int = 3  # uda-train --epochs
    iters_per_epoch: int = 100  # uda-train --iters-per-epoch
    batch_size: int | None = None  # uda-train --batch-size; None: the preset's (64 + 64)
    lr: float = 2e-3  # uda-train --lr, the encoder's (scaled to this 1.3 M-parameter teacher)
    head_lr_mult: float = 10.0  # uda-train --head-lr-mult: the head trains at lr x this
    tau: float = 3e-4  # uda-train --tau for the RST runs: under 3% of the encoder at this lr (RESULTS.md)
    extra: tuple[str, ...] = ()  # more uda-train flags, passed to every trained run
    teacher_quick: bool = False  # pre-train the teacher with teacher.QUICK settings (tests)
    teacher_steps: int | None = None  # override the teacher's optimiser steps
    jobs: int = 2  # uda-train subprocesses at a time; 0: call trainer.cli.main in this process
    threads: int = 1  # torch threads per subprocess (OMP_NUM_THREADS)
    fresh: bool = False  # rerun even when a run's workdir already holds its report

    def validate(self) -> None:
        problems = []
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            problems.append(f"unknown methods {bad}: expected some of {', '.join(METHODS)}")
        if not self.seeds:
            problems.append("no seeds given")
        for name in ("per_class", "epochs", "iters_per_epoch", "threads"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range: expected >= 1")
        if self.batch_size is not None and self.batch_size < 2:
            problems.append(f"--batch-size {self.batch_size} is out of range: expected >= 2")
        for name in ("lr", "head_lr_mult"):
            if not getattr(self, name) > 0:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range: expected > 0")
        if self.tau < 0:
            problems.append(f"--tau {self.tau} is out of range: expected >= 0")
        if self.jobs < 0:
            problems.append(f"--jobs {self.jobs} is out of range: expected >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def data_dir(self) -> Path:
        return Path(self.workdir) / "data"

    @property
    def teacher_path(self) -> Path:
        return Path(self.workdir) / "digitclip.safetensors"


def has_preset(name: str = PRESET) -> bool:
    """Whether this uda-train knows `--preset NAME`."""
    from trainer import cli

    for action in cli.build_parser()._actions:
        if "--preset" in action.option_strings:
            return action.choices is None or name in action.choices
    return False


def recipe_flags(cfg: RunConfig, preset: bool) -> list[str]:
    """The digits recipe: the preset, or the flags that stand for it."""
    flags = ["--preset", PRESET] if preset else list(PRESET_FALLBACK)
    if cfg.batch_size is not None:
        if not preset:
            flags = flags[2:]
        flags += ["--batch-size", str(cfg.batch_size)]
    return flags


def plan(cfg: RunConfig, preset: bool) -> list[Job]:
    """Every uda-train run of the benchmark, in the order they start."""
    jobs = []
    for method in cfg.methods:
        seeds: Sequence[int | None] = [None] if method == "zeroshot" else cfg.seeds
        for seed in seeds:
            argv = ["--data-root", str(cfg.data_dir), "--source-domain", data.SOURCE,
                    "--target-domain", data.TARGET, "--model", str(teacher_mod.MODEL_CONFIG),
                    "--pretrained", str(cfg.teacher_path), *METHODS[method], *recipe_flags(cfg, preset),
                    "--device", "cpu", "--workers", "0"]
            if method != "zeroshot":
                argv += ["--seed", str(seed), "--epochs", str(cfg.epochs),
                         "--iters-per-epoch", str(cfg.iters_per_epoch),
                         "--lr", repr(cfg.lr), "--head-lr-mult", repr(cfg.head_lr_mult), *cfg.extra]
                if "--rst" in argv:
                    argv += ["--tau", repr(cfg.tau)]
            name = f"{TASK}-{method.replace('+', '-')}" + ("" if seed is None else f"-s{seed}")
            argv += ["--task", name]
            digest = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:10]
            workdir = Path(cfg.workdir) / "runs" / f"{name}-{digest}"
            jobs.append(Job(TASK, method, seed, argv + ["--workdir", str(workdir)], workdir))
    return jobs


def run_all(cfg: RunConfig, jobs: list[Job], progress: Callable[[str], None]) -> list[Outcome]:
    done: list[Outcome] = []
    lock = threading.Lock()  # one line at a time from the worker threads

    def one(job: Job) -> Outcome:
        label = job.method + ("" if job.seed is None else f" seed {job.seed}")
        with lock:
            progress(f"start {label}: uda-train {' '.join(job.argv)}")
        outcome = execute(job, cfg)
        if outcome.report:
            m = outcome.report["metrics"]
            line = (f"{100 * m['target_accuracy']:.1f}% target accuracy, "
                    f"{100 * m['fraction_changed']:.2f}% of encoder weights changed, "
                    f"{m.get('wall_seconds', 0):.0f}s")
        else:
            line = f"FAILED {outcome.error}"
        with lock:
            done.append(outcome)
            progress(f"[{len(done)}/{len(jobs)}] {label}: {line}" + (" (reused)" if outcome.reused else ""))
        return outcome

    if cfg.jobs <= 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        return list(pool.map(one, jobs))


# -- the table -----------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(outcomes: Sequence[Outcome], cfg: RunConfig) -> dict:
    """Per method: accuracies over seeds with mean and spread, DSP, share of weights changed."""
    table: dict[str, dict] = {}
    for method in cfg.methods:
        runs = [o for o in outcomes if o.job.method == method]
        ok = [o.report["metrics"] for o in runs if o.report]
        row: dict = {"failed": [f"seed {o.job.seed}: {o.error}" for o in runs if not o.report]}
        if ok:
            row["accuracy"] = _stats([m["target_accuracy"] for m in ok])
            mca = [m.get("mean_class_accuracy") for m in ok]
            row["mean_class_accuracy"] = _stats(mca) if None not in mca else None
            for key in ("dsp", "nnz", "fraction_changed", "wall_seconds"):
                row[key] = statistics.fmean(m.get(key) or 0 for m in ok)
        table[method] = row
    return table


def goals(table: dict) -> list[dict]:
    """Issue 17's "done when", for the methods the table has."""
    acc = {m: 100 * r["accuracy"]["mean"] for m, r in table.items() if "accuracy" in r}
    out = []
    if "cmkd" in acc:
        for other, label in (("baseline", "source-only"), ("zeroshot", "zero-shot")):
            if other in acc:
                gain = acc["cmkd"] - acc[other]
                out.append({"goal": f"CMKD beats {label} by >= {GOAL_GAIN:g} points",
                            "value": f"{gain:+.1f} points", "met": gain >= GOAL_GAIN})
        if "cmkd+rst" in acc:
            drop = acc["cmkd"] - acc["cmkd+rst"]
            out.append({"goal": f"CMKD+RST within {GOAL_RST_DROP:g} points of CMKD",
                        "value": f"{-drop:+.1f} points", "met": drop <= GOAL_RST_DROP})
    if "cmkd+rst" in acc:
        changed = table["cmkd+rst"]["fraction_changed"]
        out.append({"goal": f"CMKD+RST changes <= {100 * GOAL_RST_CHANGED:g}% of the encoder",
                    "value": f"{100 * changed:.2f}%", "met": changed <= GOAL_RST_CHANGED})
    return out


def format_table(table: dict, checks: list[dict]) -> str:
    """Markdown: one row per method, then the goals."""
    lines = ["| method | target accuracy (%) | mean per-class (%) | DSP | encoder changed | seconds per run |",
             "|---|---|---|---|---|---|"]
    for method, row in table.items():
        if "accuracy" not in row:
            lines.append(f"| {method} | fail | - | - | - | - |")
            continue
        mca = row["mean_class_accuracy"]
        lines.append(f"| {method} | {_pct(row['accuracy'])} | {'-' if mca is None else _pct(mca)} | "
                     f"{_count(row['dsp'])} | {100 * row['fraction_changed']:.2f}% | {row['wall_seconds']:.0f} |")
    if checks:
        lines += ["", "| goal | value | met |", "|---|---|---|"]
        lines += [f"| {c['goal']} | {c['value']} | {'yes' if c['met'] else 'no'} |" for c in checks]
    return "\n".join(lines)


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f}" + (f" ±{100 * s['std']:.1f}" if len(s["values"]) > 1 else "")


def teacher_config(cfg: RunConfig) -> teacher_mod.TeacherConfig:
    values = dict(teacher_mod.QUICK) if cfg.teacher_quick else {}
    if cfg.teacher_steps is not None:
        values["steps"] = cfg.teacher_steps
    return teacher_mod.TeacherConfig(out=cfg.teacher_path, **values)


def benchmark(cfg: RunConfig, progress: Callable[[str], None] = print) -> dict:
    """Data, teacher, every run, the table; returns what results.json holds."""
    cfg.validate()
    started = time.perf_counter()
    data.write_digits(data.DigitsConfig(cfg.data_dir, cfg.per_class, cfg.data_seed))
    progress(f"data: MNIST (source) and MNIST-M (target), {cfg.per_class} images per class each, in {cfg.data_dir}")
    progress("teacher: pre-training (or reusing) ...")
    sidecar = teacher_mod.ensure_teacher(teacher_config(cfg), cfg.data_dir)
    progress(f"teacher: {cfg.teacher_path} (pre-trained in {sidecar['pretrain_seconds']}s); zero-shot "
             + ", ".join(f"{d} {100 * a['accuracy']:.1f}%" for d, a in sidecar["zero_shot"].items()))
    preset = has_preset()
    if not preset:
        progress(f"uda-train has no --preset {PRESET}: passing {' '.join(PRESET_FALLBACK)} instead")
    jobs = plan(cfg, preset)
    outcomes = run_all(cfg, jobs, progress)
    table = summarise(outcomes, cfg)
    checks = goals(table)
    runs = [{"method": o.job.method, "seed": o.job.seed, "workdir": str(o.job.workdir),
             "argv": o.job.argv, "error": o.error, "metrics": o.report["metrics"] if o.report else None,
             "source_loss_first_last": source_loss(o.job.workdir), "reused": o.reused} for o in outcomes]
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
               "preset": PRESET if preset else None,
               "teacher": {k: sidecar[k] for k in ("checkpoint", "pretrain_seconds", "zero_shot", "prompt")},
               "table": table, "goals": checks, "markdown": format_table(table, checks), "runs": runs,
               "seconds": round(time.perf_counter() - started, 1)}
    out = Path(cfg.workdir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(results["markdown"] + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m bench.digits.run",
                                description="MNIST -> MNIST-M through uda-train: zero-shot, source "
                                            "only, CMKD, CMKD+RST, CMKD+FixMatch.")
    p.add_argument("--workdir", type=Path, default=d.workdir, help="default: %(default)s")
    p.add_argument("--methods", nargs="+", default=list(d.methods), help=f"default: {' '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="default: %(default)s")
    p.add_argument("--per-class", type=int, default=d.per_class, help="default: %(default)s")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--iters-per-epoch", type=int, default=d.iters_per_epoch, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, help="images per domain per step (default: the preset's 64)")
    p.add_argument("--lr", type=float, default=d.lr, help="encoder lr (default: %(default)s)")
    p.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult, help="default: %(default)s")
    p.add_argument("--tau", type=float, default=d.tau, help="RST threshold (default: %(default)s)")
    p.add_argument("--extra", default="", help="more uda-train flags, e.g. \"--eval-every 100\"")
    p.add_argument("--teacher-quick", action="store_true", help="pre-train a quick teacher (tests)")
    p.add_argument("--teacher-steps", type=int, help="override the teacher's optimiser steps")
    p.add_argument("--jobs", type=int, default=d.jobs, help="parallel uda-train processes; 0: in-process")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose reports already exist")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="digits: %(levelname)s: %(message)s")
    values = {k: v for k, v in vars(args).items() if k != "verbose"}
    values.update(methods=tuple(args.methods), seeds=tuple(args.seeds), extra=tuple(args.extra.split()))
    cfg = RunConfig(**values)
    try:
        results = benchmark(cfg, progress=lambda line: print(f"digits: {line}", flush=True))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"digits: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print()
    print(results["markdown"])
    failed = [f"{m}: {f}" for m, row in results["table"].items() for f in row["failed"]]
    for f in failed:
        print(f"failed: {f}", file=sys.stderr)
    print(f"\nresults: {Path(cfg.workdir) / 'results.json'} ({results['seconds'] / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
