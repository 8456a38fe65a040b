"""Precision modes against fp32: do served predictions stay the same with a tau-sized residual?

    python -m bench.precision            # ViT-B-16 (random weights), tau 1e-6 and 1e-5
    python -m bench.precision --quick    # uda-tiny-vit: seconds (the smoke test)

RST residuals hold deltas just above tau (1e-6 for ViT, 1e-5 for ResNet): below bf16 and fp16
resolution of weights of order 1e-2..1, and partly below TF32's 10-bit mantissa. For each tau a
residual of --density random deltas, uniform in +-[tau, 10 tau], is applied with the server's
SwapEngine, and the same images are run under each candidate mode:

- fp32: the reference (what the server serves);
- bf16 / fp16: torch.autocast around the forward (weights stay fp32, matmuls run in 16 bit);
- tf32 (CUDA only): fp32 tensors, TF32 tensor-core matmuls and convolutions.

Reported per (tau, mode): top-1 agreement with fp32 and max |logit difference|, beside the
residual's own effect in fp32 (max |logits(base + residual) - logits(base)|, top-1 changes): a
mode whose error is larger than the residual's effect cannot be told apart from serving the
base. Also reported: the fraction of the residual's entries that would survive if the weights
themselves were stored in bf16 / fp16 ((w + d) rounds to a different value than w).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import common
from residual_store import BaseSpec, FlatResidual, make_residual
from residual_store.errors import BaseModelError
from residual_store.numerics import fp32_precision

logger = logging.getLogger(__name__)

MODES = ("fp32", "tf32", "bf16", "fp16")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class PrecisionConfig:
    """What one run measures."""

    model: str = "ViT-B-16"  # open_clip model name of the base (random init)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    images: int = 8  # images run under every mode (random pixels through the eval transform)
    batch: int = 8  # images per forward
    density: float = 0.005  # fraction of encoder weights the residual changes
    taus: tuple[float, ...] = (1e-6, 1e-5)  # RST thresholds: ViT and ResNet defaults
    modes: tuple[str, ...] | None = None  # None: fp32,bf16,fp16 on CPU, plus tf32 on CUDA
    seed: int = 0  # images, residuals, head

    def validate(self) -> None:
        """Raise ValueError listing every problem at once."""
        problems = []
        if self.images < 1 or self.batch < 1:
            problems.append(f"--images {self.images} / --batch {self.batch}: must be >= 1")
        if not 0 < self.density <= 1:
            problems.append(f"--density {self.density}: must be in (0, 1]")
        if not self.taus or min(self.taus) <= 0:
            problems.append(f"--taus {self.taus}: need positive thresholds")
        if self.modes is not None:
            unknown = sorted(set(self.modes) - set(MODES))
            if unknown:
                problems.append(f"--modes {','.join(self.modes)}: unknown {unknown}; choose from {','.join(MODES)}")
        if problems:
            raise ValueError("; ".join(problems))


def default_modes(device: torch.device) -> tuple[str, ...]:
    return ("fp32", "tf32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16", "fp16")


@contextlib.contextmanager
def precision(mode: str, device: torch.device):
    """The numeric mode of every forward run inside."""
    if mode == "fp32":
        with fp32_precision("ieee"):  # the reference: what the server computes
            yield
    elif mode == "tf32":
        if device.type != "cuda":
            raise ValueError("tf32 is a CUDA matmul mode: run with --device cuda, or drop it from --modes")
        with fp32_precision("tf32"):
            yield
    else:
        with torch.autocast(device.type, dtype=HALF[mode]):
            yield


def logits_under(engine, key, flat: FlatResidual, head, imgs: torch.Tensor, mode: str, batch: int) -> torch.Tensor:
    out = []
    with precision(mode, engine.device):
        for i in range(0, imgs.shape[0], batch):
            logits, _ = engine.run(key, flat, head, imgs[i:i + batch])
            out.append(logits.float())
    return torch.cat(out)


def survival(buffer: torch.Tensor, flat: FlatResidual, dtype: torch.dtype) -> float:
    """Fraction of residual entries whose weight, rounded to `dtype`, differs from the base's."""
    w = buffer.index_select(0, flat.index)
    return float(((w + flat.values).to(dtype) != w.to(dtype)).float().mean())


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    return {"top1_match": float((ref.argmax(1) == other.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((ref - other).abs().max())}


def run(cfg: PrecisionConfig) -> dict:
    from server.engine import SwapEngine

    engine = SwapEngine(BaseSpec(cfg.model), cfg.device)
    engine.setup()
    modes = cfg.modes or default_modes(engine.device)
    g = torch.Generator().manual_seed(cfg.seed)
    head = common.random_head(engine.embed_dim, common.DEFAULT_CLASSES, g).to(engine.device)
    imgs = common.images(cfg.images, engine.input_size, seed=cfg.seed)
    empty = FlatResidual(torch.zeros(0, dtype=torch.int64, device=engine.device),
                         torch.zeros(0, dtype=engine.flat.buffer.dtype, device=engine.device))
    base = logits_under(engine, "base", empty, head, imgs, "fp32", cfg.batch)
    rows = []
    for tau in cfg.taus:
        deltas = common.random_deltas(engine.layout, cfg.density, tau, 10 * tau, g)
        residual = make_residual(deltas, head, task=f"tau{tau:g}", classes=[f"c{i}" for i in range(common.DEFAULT_CLASSES)],
                                        base_model=cfg.model, base_pretrained=engine.spec.pretrained_label,
                                        base_fingerprint=engine.fingerprint)
        flat = residual.to_flat(engine.layout, engine.flat.buffer.dtype, engine.device)
        key = f"tau{tau:g}"
        engine.restore()
        kept = {name: survival(engine.flat.buffer, flat, dt) for name, dt in HALF.items()}
        ref = logits_under(engine, key, flat, head, imgs, "fp32", cfg.batch)
        effect = compare(base, ref)
        for mode in modes:
            logger.info("tau %g: %s", tau, mode)
            out = ref if mode == "fp32" else logits_under(engine, key, flat, head, imgs, mode, cfg.batch)
            cmp = compare(ref, out)
            rows.append({"tau": tau, "mode": mode, **cmp,
                         "residual_effect_max_abs": effect["max_abs_logit_diff"],
                         "residual_top1_changes": 1.0 - effect["top1_match"],
                         "error_over_effect": cmp["max_abs_logit_diff"] / max(effect["max_abs_logit_diff"], 1e-30),
                         "weights_kept_bf16": kept["bf16"], "weights_kept_fp16": kept["fp16"],
                         "agreement_shown": cmp["top1_match"] == 1.0
                         and cmp["max_abs_logit_diff"] < effect["max_abs_logit_diff"]})
    engine.restore()
    return {"scenario": "precision", "config": dataclasses.asdict(cfg) | {"modes": list(modes)},
            "machine": common.machine_info(engine.device), "encoder_params": engine.layout.numel,
            "rows": rows}


def table(payload: dict) -> str:
    headers = ["tau", "mode", "top-1 match vs fp32", "max abs logit diff vs fp32",
               "residual effect (fp32, max abs logit)", "error / effect",
               "residual top-1 changes (fp32)", "entries kept in bf16 / fp16 weights",
               "agreement shown"]
    body = [[f"{r['tau']:g}", r["mode"], f"{r['top1_match']:.1%}", f"{r['max_abs_logit_diff']:.3g}",
             f"{r['residual_effect_max_abs']:.3g}", f"{r['error_over_effect']:.3g}",
             f"{r['residual_top1_changes']:.1%}",
             f"{r['weights_kept_bf16']:.1%} / {r['weights_kept_fp16']:.1%}",
             "reference" if r["mode"] == "fp32" else ("yes" if r["agreement_shown"] else "no")]
            for r in payload["rows"]]
    return common.markdown_table(headers, body)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from e


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n")[0])
    d = PrecisionConfig()
    p.add_argument("--quick", action="store_true", help="uda-tiny-vit, 32 images (smoke test)")
    p.add_argument("--model", default=None, help=f"default: {d.model}")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--images", type=int, default=None, help=f"default: {d.images} (--quick: 32)")
    p.add_argument("--batch", type=int, default=d.batch, help="default: %(default)s")
    p.add_argument("--density", type=float, default=d.density, help="default: %(default)s")
    p.add_argument("--taus", type=_floats, default=d.taus, help="default: 1e-6,1e-5")
    p.add_argument("--modes", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
                   default=None, help="default: fp32,bf16,fp16 (+tf32 on CUDA)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--quick: 1)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="JSON folder (default: bench/results)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    common.setup_logging(args.quiet)
    common.set_threads(args.threads if args.threads is not None else (1 if args.quick else None))
    cfg = PrecisionConfig(model=args.model or ("uda-tiny-vit" if args.quick else d.model), device=args.device,
                          images=args.images if args.images is not None else (32 if args.quick else d.images), batch=args.batch,
                          density=args.density, taus=args.taus, modes=args.modes, seed=args.seed)
    try:
        cfg.validate()
        payload = run(cfg)
    except (ValueError, BaseModelError) as e:
        print(f"bench.precision: error: {e}", file=sys.stderr)
        return 2
    print(f"Precision: {cfg.model} (random init), {cfg.images} images, residual density {cfg.density:g} "
          f"with deltas uniform in +-[tau, 10 tau]; agreement shown = top-1 100% and max logit error "
          f"below the residual's own effect")
    print(common.machine_line(payload["machine"]))
    print(table(payload))
    path = common.write_json(common.result_path(args.out, "precision"), payload)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
