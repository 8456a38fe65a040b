"""Training-step time and peak memory on CPU, with and without RST (the mask step's cost).

    python -m bench.train_step            # uda-tiny-vit and ViT-B-16 (random weights), a few minutes
    python -m bench.train_step --quick    # uda-tiny-vit only, seconds

Each configuration runs in its own process (peak RSS is per process), builds the real Trainer
on a generated image world and times `Trainer.train_step` (forward of 8 source + 8 target images,
CMKD losses, backward, SGD, and for RST the mask step) on fixed pre-loaded batches, so data
loading is not measured. Reported: median step time, median time of the RST mask step alone,
peak resident memory, and the with/without-RST ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

MODELS = ("uda-tiny-vit", "ViT-B-16")


def measure(model: str, rst: bool, batch: int, warmup: int, steps: int) -> dict:
    """One configuration, in this process."""
    import torch

    from trainer.config import TrainConfig
    from trainer.demo import make_shapes_world
    from trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        world = make_shapes_world(Path(tmp) / "data", per_class=2, size=32)
        cfg = TrainConfig(source=world["photo"], target=world["sketch"], model=model, pretrained=None,
                          rst=rst, batch_size=batch, workers=0, device="cpu", workdir=Path(tmp) / "run")
        cfg.validate()
        trainer = Trainer(cfg)
        trainer.setup()
        g = torch.Generator().manual_seed(0)
        size = trainer.input_size
        source = (torch.randn(batch, 3, size, size, generator=g),
                  torch.randint(0, len(trainer.class_names), (batch,), generator=g))
        target = (torch.randn(batch, 3, size, size, generator=g),)
        step_times, mask_times = [], []
        for i in range(warmup + steps):
            started = time.perf_counter()
            trainer.train_step((source, target))
            elapsed = time.perf_counter() - started
            if i >= warmup:
                step_times.append(elapsed)
                if trainer.sparsifier is not None:
                    t = time.perf_counter()
                    trainer.sparsifier.step()  # idempotent: times the mask step alone
                    mask_times.append(time.perf_counter() - t)
        encoder_params = trainer.flat.layout.numel
    return {
        "model": model, "rst": rst, "batch": batch, "steps": steps,
        "step_ms": 1e3 * statistics.median(step_times),
        "mask_ms": 1e3 * statistics.median(mask_times) if mask_times else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "encoder_params": encoder_params,
    }


def run_isolated(model: str, rst: bool, batch: int, warmup: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "bench.train_step", "--one", model, "--batch", str(batch),
           "--warmup", str(warmup), "--steps", str(steps)] + (["--rst"] if rst else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | encoder params | RST | step (ms, median) | RST mask step (ms) | "
             "step ratio RST / no RST | mask / step | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r["step_ms"] for r in rows if not r["rst"]}
    for r in rows:
        ref = base.get(r["model"], float("nan"))
        lines.append(f"| {r['model']} | {r['encoder_params'] / 1e6:.2f} M | {'yes' if r['rst'] else 'no'} "
                     f"| {r['step_ms']:.1f} | {r['mask_ms']:.2f} | {r['step_ms'] / ref:.3f} "
                     f"| {r['mask_ms'] / ref:.2%} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="uda-tiny-vit only")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="default: %(default)s")
    p.add_argument("--batch", type=int, default=8, help="images per domain (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured steps first (default: 2 for tiny models, 1 otherwise)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps per configuration (default: 20 for tiny models, 3 otherwise)")
    p.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)  # internal: one config
    p.add_argument("--rst", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    def steps_for(model: str) -> int:
        return args.steps or (20 if model.startswith("uda-tiny") else 3)

    def warmup_for(model: str) -> int:
        return args.warmup if args.warmup is not None else (2 if model.startswith("uda-tiny") else 1)

    if args.one:
        print(json.dumps(measure(args.one, args.rst, args.batch, warmup_for(args.one), steps_for(args.one))))
        return 0
    models = ["uda-tiny-vit"] if args.quick else args.models
    rows = []
    for model in models:
        for rst in (False, True):
            print(f"measuring {model} rst={rst} ...", file=sys.stderr, flush=True)
            rows.append(run_isolated(model, rst, args.batch, warmup_for(model), steps_for(model)))
    import torch

    print(f"CPU training step, batch {args.batch} source + {args.batch} target, random weights, "
          f"{torch.get_num_threads()} threads; mask / step = the RST mask step's median time over the "
          "median step without RST (the steadier measure of RST's cost on a busy machine)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
