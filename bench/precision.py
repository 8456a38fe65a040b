"""Serving precision decided on TRAINED residuals: target accuracy and speed in fp32 and bf16.

    python -m bench.precision runs/precision/toyworld/runs/*/ runs/digits/runs/*rst*/   # accuracy + speed
    python -m bench.precision                               # speed only (ViT-B-16, random weights)
    python -m bench.precision --quick                       # a 3-step uda-train residual, uda-tiny-vit (smoke)

Accuracy: each argument is a `uda-train` workdir (report.json + residual.safetensors). Its base
is rebuilt from the report, its target images are read from the folder the report names, and
every image is run through the server's own SwapEngine in each mode:

- fp32: the reference, what `uda-serve` serves by default;
- bf16: `uda-serve --precision bf16`: bf16 base, the residual's targets rounded once, fp32 head;
- bf16-autocast: fp32 weights with torch.autocast(bf16) around the forward (not offered by the
  server: the deltas live in fp32 weights, but every matmul rounds its inputs);
- tf32 (CUDA only): fp32 tensors, TF32 matmuls and convolutions.

Reported per residual and mode: target accuracy, its difference from fp32 in points, top-1
agreement with fp32, and (bf16) the share of the residual's entries whose target differs from
the bf16 base, i.e. that survive rounding. Beside them: the base alone with the same head (the
residual's own effect on accuracy) and what uda-train recorded. Speed: images/s of the encoder
and head at each batch size in each mode, on --speed-model with random weights (the speed of a
forward pass does not depend on the weights), a residual applied.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import common
from bench.lite import int_list
from residual_store import BaseSpec, FlatResidual, from_bytes
from residual_store.errors import BaseModelError
from residual_store.numerics import fp32_precision
from residual_store.precision import ACCURACY_KEY

logger = logging.getLogger(__name__)

MODES = ("fp32", "bf16", "bf16-autocast", "tf32")
ENGINE_PRECISION = {"fp32": "fp32", "bf16": "bf16", "bf16-autocast": "fp32", "tf32": "fp32"}


@dataclasses.dataclass
class PrecisionConfig:
    """What one run measures."""

    workdirs: tuple[Path, ...] = ()  # uda-train workdirs of trained residuals
    speed_model: str | None = "ViT-B-16"  # open_clip model (random weights) timed; None: no timing
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    batches: tuple[int, ...] = (1, 8)  # batch sizes timed
    repeats: int = 5  # timed forward passes per (mode, batch); the median is reported
    eval_batch: int = 64  # images per forward in the accuracy runs
    modes: tuple[str, ...] | None = None  # None: fp32, bf16, bf16-autocast (+ tf32 on CUDA)

    def validate(self) -> None:
        """Raise ValueError listing every problem at once."""
        problems = []
        if not self.batches or min(self.batches) < 1:
            problems.append(f"--batches {','.join(map(str, self.batches))}: need sizes >= 1")
        if self.repeats < 1 or self.eval_batch < 1:
            problems.append(f"--repeats {self.repeats} / --eval-batch {self.eval_batch}: must be >= 1")
        if self.modes is not None:
            unknown = sorted(set(self.modes) - set(MODES))
            if unknown or "fp32" not in self.modes:
                problems.append(f"--modes {','.join(self.modes)}: unknown {unknown} or no fp32 "
                                f"reference; choose from {','.join(MODES)}")
        for workdir in self.workdirs:
            missing = [n for n in ("report.json", "residual.safetensors") if not (workdir / n).is_file()]
            if missing:
                problems.append(f"{workdir}: not a finished uda-train workdir (no {', '.join(missing)})")
        if problems:
            raise ValueError("; ".join(problems))


def default_modes(device: torch.device) -> tuple[str, ...]:
    return MODES if device.type == "cuda" else MODES[:3]


@contextlib.contextmanager
def numerics(mode: str, device: torch.device):
    """What runs around each forward of `mode` (the weights' dtype is the engine's)."""
    if mode == "tf32":
        if device.type != "cuda":
            raise ValueError("tf32 is a CUDA matmul mode: run with --device cuda, or drop it from --modes")
        with fp32_precision("tf32"):
            yield
    elif mode == "bf16-autocast":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


class Engines:
    """One SwapEngine per (base, precision), built on first use."""

    def __init__(self, device: str):
        self.device = device
        self._engines: dict[tuple, object] = {}

    def get(self, spec: BaseSpec, mode: str):
        from server.engine import SwapEngine

        key = (spec.model, spec.pretrained, spec.quick_gelu, ENGINE_PRECISION[mode])
        if key not in self._engines:
            engine = SwapEngine(spec, self.device, ENGINE_PRECISION[mode])
            engine.setup()
            self._engines[key] = engine
        return self._engines[key]

    def drop(self) -> None:
        self._engines.clear()


def logits_of(engine, key, form, head, images: torch.Tensor, mode: str, batch: int) -> torch.Tensor:
    out = []
    with numerics(mode, engine.device):
        for i in range(0, images.shape[0], batch):
            logits, _ = engine.run(key, form, head, images[i:i + batch])
            out.append(logits.float())
    engine.restore()
    return torch.cat(out)


# -- accuracy of trained residuals --------------------------------------------------------------

@dataclasses.dataclass
class Trained:
    """A uda-train workdir: its residual, base and target images."""

    workdir: Path
    report: dict
    residual: object  # residual_store.Residual
    spec: BaseSpec

    @classmethod
    def read(cls, workdir: Path) -> Trained:
        report = json.loads((workdir / "report.json").read_text())
        residual = from_bytes((workdir / "residual.safetensors").read_bytes())
        cfg = report["config"]
        return cls(workdir, report, residual, BaseSpec(cfg["model"], cfg.get("pretrained"), cfg.get("quick_gelu")))

    @property
    def name(self) -> str:
        return self.workdir.name

    def target_images(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every labelled target image through the serving transform, and the labels."""
        from trainer import data

        evaluated = self.report.get("evaluated_on") or {}
        what = evaluated.get("what") or ""
        if not what.startswith("--"):
            raise ValueError(f"{self.workdir}: report.json names no labelled target (evaluated_on)")
        domain = data.scan_domain(Path(what.split(" ", 1)[1]), self.report["classes"], "target")
        xs, ys = [], []
        for x, y in data.readable_batches(data.eval_loader(domain, size, 256, 0), []):
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def settings(self) -> str:
        cfg = self.report["config"]
        return f"lr {cfg.get('lr'):g}, tau {cfg.get('tau'):g}" if cfg.get("rst") else f"lr {cfg.get('lr'):g}"


def accuracy_rows(trained: Trained, engines: Engines, modes: Sequence[str], eval_batch: int) -> list[dict]:
    r = trained.residual
    fp32_engine = engines.get(trained.spec, "fp32")
    images, labels = trained.target_images(fp32_engine.input_size)
    head = r.build_head().to(fp32_engine.device)
    empty = FlatResidual(torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    base = logits_of(fp32_engine, ("base", "-"), empty, head, images, "fp32", eval_batch)
    recorded = json.loads(r.metadata.get("metrics") or "{}").get(ACCURACY_KEY) or {}
    metrics = trained.report["metrics"]
    common_row = {"residual": trained.name, "task": r.task, "settings": trained.settings(),
                  "model": trained.spec.model, "images": int(labels.numel()), "nnz": r.nnz,
                  "fraction_changed": metrics.get("fraction_changed"),
                  "base_with_head_accuracy": accuracy(base, labels)}
    rows, ref = [], None
    for mode in modes:
        engine = engines.get(trained.spec, mode)
        form = engine.resident_form(r).to(engine.device)
        logger.info("%s: %s", trained.name, mode)
        started = time.perf_counter()
        out = logits_of(engine, (r.task, trained.name), form, head, images, mode, eval_batch)
        seconds = time.perf_counter() - started
        ref = out if mode == "fp32" else ref
        rows.append({**common_row, "mode": mode, "accuracy": accuracy(out, labels),
                     "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                     "entries_kept": form.nnz / max(r.nnz, 1), "eval_seconds": round(seconds, 2),
                     "recorded_accuracy": recorded.get(ENGINE_PRECISION[mode]) if mode in ("fp32", "bf16") else None})
    for row in rows:  # counts of images: the difference is exact to 4 decimals
        row["vs_fp32_points"] = round(100 * (row["accuracy"] - rows[0]["accuracy"]), 4) + 0.0
    return rows


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


# -- speed ----------------------------------------------------------------------------------------

def speed_rows(cfg: PrecisionConfig, modes: Sequence[str]) -> list[dict]:
    engines = Engines(cfg.device)
    rows = []
    spec = BaseSpec(cfg.speed_model)  # random weights: the speed of a forward pass is the same
    for mode in modes:
        engine = engines.get(spec, mode)
        residual = common.random_residual(engine.residual_layout, task="speed", density=0.005,
                                          base_model=cfg.speed_model, base_pretrained="random",
                                          base_fingerprint=engine.fingerprint, dim=engine.embed_dim,
                                          seed=0)
        form = engine.resident_form(residual).to(engine.device)
        head = residual.build_head().to(engine.device)
        for batch in cfg.batches:
            x = common.images(batch, engine.input_size, seed=batch)
            with numerics(mode, engine.device):
                engine.run(("speed", mode), form, head, x)  # warm-up (and the one swap)
                times = []
                for _ in range(cfg.repeats):
                    common.sync(engine.device)
                    started = time.perf_counter()
                    engine.run(("speed", mode), form, head, x)
                    common.sync(engine.device)
                    times.append(time.perf_counter() - started)
            seconds = common.median(times)
            rows.append({"model": cfg.speed_model, "mode": mode, "batch": batch,
                         "ms_per_batch": seconds * 1e3, "images_per_s": batch / seconds,
                         "runs_ms": [t * 1e3 for t in times]})
            logger.info("speed %s batch %d: %.1f ms", mode, batch, seconds * 1e3)
        engine.restore()
        engines.drop()  # one ViT-B-16 at a time
    for row in rows:
        ref = next(r for r in rows if r["mode"] == "fp32" and r["batch"] == row["batch"])
        row["speedup_vs_fp32"] = row["images_per_s"] / ref["images_per_s"]
    return rows


# -- the run -------------------------------------------------------------------------------------

def run(cfg: PrecisionConfig) -> dict:
    from server.engine import resolve_device

    device = resolve_device(cfg.device)
    modes = cfg.modes or default_modes(device)
    engines = Engines(cfg.device)
    rows = []
    for workdir in cfg.workdirs:
        rows += accuracy_rows(Trained.read(workdir), engines, modes, cfg.eval_batch)
    engines.drop()
    speed = speed_rows(cfg, modes) if cfg.speed_model else []
    return {"scenario": "precision", "machine": common.machine_info(device),
            "config": {**dataclasses.asdict(cfg), "workdirs": [str(w) for w in cfg.workdirs],
                       "modes": list(modes)},
            "rows": rows, "speed": speed}


def accuracy_table(payload: dict) -> str:
    headers = ["residual", "settings", "changed", "base + head", "mode", "target acc.", "vs fp32 (points)",
               "top-1 = fp32", "entries kept", "uda-train recorded"]
    body = []
    for r in payload["rows"]:
        kept = f"{r['entries_kept']:.1%}" if r["mode"] == "bf16" else ""
        recorded = f"{r['recorded_accuracy']:.2%}" if r["recorded_accuracy"] is not None else ""
        body.append([r["residual"], r["settings"], f"{r['nnz']:,} ({(r['fraction_changed'] or 0):.2%})",
                     f"{r['base_with_head_accuracy']:.2%}", r["mode"], f"{r['accuracy']:.2%}",
                     "reference" if r["mode"] == "fp32" else f"{r['vs_fp32_points']:+.2f}",
                     f"{r['top1_agreement']:.2%}", kept, recorded])
    return common.markdown_table(headers, body)


def speed_table(payload: dict) -> str:
    headers = ["model", "mode", "batch", "ms / batch (median)", "images/s", "x fp32"]
    body = [[r["model"], r["mode"], r["batch"], f"{r['ms_per_batch']:.1f}", f"{r['images_per_s']:.2f}",
             f"{r['speedup_vs_fp32']:.2f}"] for r in payload["speed"]]
    return common.markdown_table(headers, body)


def quick_workdir(root: Path) -> Path:
    """A 3-step uda-train CMKD+RST residual on a tiny shapes world (the smoke test's input)."""
    from trainer import cli
    from trainer.demo import make_shapes_world

    world = make_shapes_world(root / "world", classes=("circle", "square", "triangle"), per_class=5, size=40)
    workdir = root / "run"
    code = cli.main(["--source", str(world["photo"]), "--target", str(world["sketch"]),
                     "--model", "uda-tiny-vit", "--pretrained", "random", "--method", "cmkd", "--rst",
                     "--epochs", "1", "--iters-per-epoch", "3", "--batch-size", "4", "--workers", "0",
                     "--device", "cpu", "--lr", "1e-3", "--head-lr-mult", "10", "--workdir", str(workdir)])
    if code != 0:
        raise RuntimeError(f"uda-train of the quick residual exited {code}")
    return workdir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n")[0])
    d = PrecisionConfig()
    p.add_argument("workdirs", nargs="*", type=Path, help="uda-train workdirs of trained residuals")
    p.add_argument("--quick", action="store_true",
                   help="a 3-step uda-train residual and uda-tiny-vit timing (smoke test)")
    p.add_argument("--speed-model", default=None, help=f"model timed, random weights (default: {d.speed_model})")
    p.add_argument("--no-speed", action="store_true", help="accuracy only")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--batches", type=int_list, default=d.batches, help="batch sizes timed (default: 1,8)")
    p.add_argument("--repeats", type=int, default=None, help=f"timed passes (default: {d.repeats}; --quick: 3)")
    p.add_argument("--eval-batch", type=int, default=d.eval_batch, help="default: %(default)s")
    p.add_argument("--modes", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
                   default=None, help="default: fp32,bf16,bf16-autocast (+tf32 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="JSON folder (default: bench/results)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    common.setup_logging(args.quiet)
    common.set_threads(args.threads)
    speed_model = None if args.no_speed else (args.speed_model or ("uda-tiny-vit" if args.quick else d.speed_model))
    cfg = PrecisionConfig(workdirs=tuple(args.workdirs), speed_model=speed_model, device=args.device,
                          batches=args.batches, eval_batch=args.eval_batch, modes=args.modes,
                          repeats=args.repeats if args.repeats is not None else (3 if args.quick else d.repeats))
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        try:
            cfg.validate()
            if args.quick and not cfg.workdirs:
                cfg.workdirs = (quick_workdir(Path(tmp)),)
            payload = run(cfg)
        except (ValueError, BaseModelError) as e:
            print(f"bench.precision: error: {e}", file=sys.stderr)
            return 2
    print("Precision on trained residuals: target accuracy per serving mode (the server's SwapEngine); "
          "'base + head' = the residual's head on the unchanged base (fp32)")
    print(common.machine_line(payload["machine"]))
    if payload["rows"]:
        print(accuracy_table(payload))
    if payload["speed"]:
        print(f"\nSpeed: {cfg.speed_model} (random weights) with a 0.5%-dense residual applied, "
              f"median of {cfg.repeats} passes")
        print(speed_table(payload))
    path = common.write_json(common.result_path(args.out, "precision"), payload)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
