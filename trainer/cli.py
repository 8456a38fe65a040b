"""`uda-train`: adapt a CLIP image encoder to a target domain (CMKD + RST) and publish it.

    uda-train --source data/Art --target data/Clipart --model ViT-B-16 --pretrained openai \\
        --method cmkd --rst --workdir runs/Ar2Cl --publish redis://redis:6379/0 --task Ar2Cl
    uda-train --data-root data/office-home --source-domain Art --target-domain Clipart --rst
    uda-train --data-root data/office31 --source-domain amazon --target-domain webcam --rst
    uda-train --source ... --target ... --method zeroshot --publish ./residuals --task Ar2Cl_zs

Every flag is validated (and every problem listed at once) before anything trains; --dry-run
stops there. Progress: a tqdm bar per epoch, workdir/train_log.jsonl (one line per step),
workdir/checkpoint.pt (every --checkpoint-every steps and each epoch end); --resume continues
from it and gives the same final weights as an uninterrupted run. At the end the exported
residual (workdir/residual.safetensors) is evaluated on a freshly built base, its metrics are
written to workdir/report.json and the residual metadata, and it is published with --publish.

Several GPUs: `torchrun --nproc-per-node 4 -m trainer.cli ...` (or the `uda-train` entry
point under torchrun). Each process trains on its own sample stream (seeded by its rank) with
--batch-size images per domain, so the effective batch is nproc x --batch-size; gradients are
averaged by DistributedDataParallel and RST applies the same mask on every rank. Rank 0
writes logs and checkpoints (the workdir must be on a shared filesystem for --resume),
evaluates the exported residual and publishes it; the other ranks exit after training. A
non-finite loss on any rank stops every rank at that step; a rank that dies makes the others
fail too (at the latest after trainer.distributed.TIMEOUT) instead of waiting forever.

Ctrl-C stops after the current step with a checkpoint; a second Ctrl-C stops at once, keeping
the last checkpoint. Either way --resume continues exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from residual_store.cli import parse_command_line
from residual_store.errors import BaseModelError, ResidualStoreError
from trainer.config import ALPHAS, CROPS, DEVICES, METHODS, TrainConfig
from trainer.presets import PRESET_NAMES, PRESETS
from trainer import checkpoint

if TYPE_CHECKING:
    from trainer.loop import Trainer
from trainer.errors import CheckpointError, ConfigError, DataError, PublishError, TrainerError

PROG = "uda-train"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=PROG, description="Adapt a CLIP image encoder to a target "
                                "domain with CMKD (+ RST) and publish the residual.")
    g = p.add_argument_group("data (ImageFolder layout DOMAIN/<class>/<image>, or Office-31's "
                             "DOMAIN/images/<class>/<image>)")
    g.add_argument("--source", type=Path, help="labelled source domain folder")
    g.add_argument("--target", type=Path, help="unlabelled target domain folder (labels only evaluate)")
    g.add_argument("--target-eval", type=Path, metavar="DIR",
                   help="labelled held-out target split to evaluate instead of --target")
    g.add_argument("--data-root", type=Path, help="dataset root with one folder per domain")
    g.add_argument("--source-domain", help="source domain folder under --data-root (e.g. Art)")
    g.add_argument("--target-domain", help="target domain folder under --data-root (e.g. Clipart)")
    g.add_argument("--classes", dest="classes_file", type=Path, metavar="FILE",
                   help="display names, one per line, in sorted class-folder order")
    g.add_argument("--prompt", default=d.prompt, help="CLIP prompt template (default: %(default)r)")
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", choices=PRESET_NAMES, help="the paper's recipe for a benchmark; "
                   "explicit flags override it: " + "; ".join(f"{n}: {PRESETS[n].description}"
                                                              for n in PRESET_NAMES))
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="open_clip model name or model-config JSON "
                   "(default: %(default)s; tiny test configs: uda-tiny-vit, uda-tiny-rn)")
    g.add_argument("--pretrained", default=d.pretrained, help="pretrained tag, local checkpoint "
                   "file, or 'random' for seeded random weights (default: %(default)s)")
    g.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="build with QuickGELU, as OpenAI trained its CLIPs (default: when the "
                   "weights are OpenAI's)")
    g = p.add_argument_group("method (METHOD.md)")
    g.add_argument("--method", choices=METHODS, default=d.method)
    g.add_argument("--rst", action="store_true", help="Residual Sparse Training")
    g.add_argument("--tau", type=float, help="RST threshold (default: ViT 1e-6, ResNet 1e-5)")
    g.add_argument("--fixmatch", action="store_true", help="add the FixMatch term (cmkd only)")
    g.add_argument("--fixmatch-threshold", type=float, default=d.fixmatch_threshold)
    g.add_argument("--fixmatch-weight", type=float, default=d.fixmatch_weight,
                   help="weight of each FixMatch term (default: %(default)s)")
    g.add_argument("--alpha", choices=ALPHAS, default=d.alpha, help="CMKD trade-off: "
                   "exp(-KL(p_g||p_h)) (the paper), exp(-entropy(p_h)), or fixed --alpha-value")
    g.add_argument("--alpha-value", type=float, default=d.alpha_value,
                   help="the trade-off of --alpha fixed (default: %(default)s)")
    g.add_argument("--task-weight", type=float, default=d.task_weight,
                   help="multiplies L_task; 0 switches it off (default: %(default)s)")
    g.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="multiplies L_distill; 0 switches it off (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--lambda1", type=float, default=d.lambda1)
    g.add_argument("--lambda2", type=float, default=d.lambda2)
    g.add_argument("--lambda3", type=float, default=d.lambda3)
    g.add_argument("--gamma", type=float, default=d.gamma, help="ramp steepness")
    g.add_argument("--ramp-max-steps", type=int, help="ramp T_max (default: epochs x iters-per-epoch)")
    g = p.add_argument_group("augmentation of the training views")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip,
                   help="random horizontal flips (--no-hflip for digits, text, anything a "
                   "mirror turns into another class)")
    g.add_argument("--crop", choices=CROPS, default=d.crop, help="random: resize to S*256/224 "
                   "and crop S (default); random-resized: RandomResizedCrop to S; none: resize to S")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of --crop random-resized (default: 0.08 1.0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--iters-per-epoch", type=int, default=d.iters_per_epoch)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per domain per step")
    g.add_argument("--lr", type=float, help="encoder lr (default: ViT 3e-6, ResNet 3e-7)")
    g.add_argument("--head-lr-mult", type=float, help="head lr = lr x this (default: ViT 1000, ResNet 10000)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("execution")
    g.add_argument("--device", choices=DEVICES, default=d.device)
    g.add_argument("--workers", type=int, default=d.workers,
                   help="data loader processes (and threads decoding every image once up front; "
                   "default: %(default)s, at most the CPU count)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    g.add_argument("--workdir", type=Path, default=d.workdir, help="default: %(default)s")
    g.add_argument("--resume", action="store_true", help="continue from WORKDIR/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a workdir that "
                   "holds a run, removing that run's checkpoint, log, report, residual and plots")
    g.add_argument("--allow-data-change", action="store_true", help="--resume although images "
                   "were added, removed or changed since the checkpoint (on purpose)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps")
    g.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="stop after this global step with a checkpoint; continue with --resume")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="evaluate the target every STEPS steps during training (curves in "
                   "training.png, the best step in report.json)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="STEPS",
                   help="steps between progress lines when stderr is not a terminal "
                   "(also at least every 30 s; default: %(default)s)")
    g.add_argument("--publish", metavar="STORE_URL", help="store to publish to: a directory, "
                   "file:///path or redis://host:6379/0")
    g.add_argument("--task", help="task name (default: <source>2<target> folder names)")
    g.add_argument("--allow-class-change", action="store_true", help="let --publish replace a "
                   "task whose class list or base (model, weights) differs from this run's")
    g.add_argument("--dry-run", action="store_true", help="validate everything, train nothing")
    g.add_argument("--verbose", "-v", action="store_true", help="log progress details")
    return p


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The settings the command line names explicitly (they override a --preset)."""
    parser = build_parser()
    for action in parser._actions:  # a default that never appears marks what was not given
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def config_from_args(args: argparse.Namespace, given: set[str] | None = None) -> TrainConfig:
    """`given`: the flags named on the command line (None: all of them, as from a script)."""
    values = {k: v for k, v in vars(args).items()
              if k != "verbose" and (given is None or k in given)}
    if values.get("pretrained") in ("", "none", "None"):
        values["pretrained"] = None
    if values.get("crop_scale") is not None:
        values["crop_scale"] = tuple(values["crop_scale"])
    return TrainConfig.from_settings(values)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    if isinstance(args, int):
        return args
    logging.getLogger("trainer.progress").setLevel(logging.INFO)  # progress lines off a terminal
    cfg = config_from_args(args, given_flags(argv))
    if cfg.pretrained in (None, "", "random"):  # random weights were asked for: no need to say
        logging.getLogger().addFilter(_no_random_weights_warning)  # so at every model build
    try:
        cfg.validate()
        return run(cfg)
    except ConfigError as e:
        return _fail(f"invalid configuration: {e}", 2)
    except (DataError, CheckpointError, BaseModelError) as e:
        return _fail(str(e), 2)
    except (TrainerError, ResidualStoreError, OSError) as e:
        return _fail(str(e), 1)


def run(cfg: TrainConfig) -> int:
    from trainer.export import export  # torch: not for --help or a refused configuration
    from trainer.loop import Trainer

    wall_start = time.perf_counter()
    trainer = Trainer(cfg)
    workdir = Path(cfg.workdir)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 owns the workdir
    with contextlib.ExitStack() as held:
        try:
            if main_rank and workdir.is_dir():  # before the scan, before a checkpoint is read
                held.enter_context(checkpoint.locked(workdir))
            check_store(cfg)
            trainer.setup()
            if cfg.dry_run:
                return dry_run(trainer)
            if cfg.resume and cfg.stop_after is not None and trainer.step >= cfg.stop_after:
                print(f"nothing to do: {trainer.checkpoint_path} is at step {trainer.step} and "
                      f"--stop-after is {cfg.stop_after}; to go on, --resume with a later "
                      "--stop-after or without it")
                return 0
            check_task_contract(trainer)
            if main_rank and not workdir.is_dir():
                held.enter_context(checkpoint.locked(workdir))  # created now the data is valid
            if main_rank and cfg.overwrite:
                checkpoint.remove_run(workdir)
            result = trainer.train()
            if not trainer.is_main:
                return 0
            if not result.finished:
                print(f"stopped after step {result.steps} of {trainer.cfg.total_steps}; checkpoint "
                      f"in {trainer.checkpoint_path}; continue with the same flags and --resume")
                return 0
            exported = export(trainer, result, wall_start)
            _print_outcome(workdir, exported)
            if cfg.publish:
                return _publish(trainer, exported)
            return 0
        except KeyboardInterrupt:
            saved = trainer.checkpoint_step
            where = ("no checkpoint was written yet" if saved is None else
                     f"checkpoint of step {saved} in {trainer.checkpoint_path}; continue with the "
                     "same flags and --resume")
            print(f"{PROG}: interrupted at step {trainer.step}; {where}", file=sys.stderr)
            return 130
        finally:
            trainer.cleanup()
    return 0  # not reached: every path above returns


def _print_outcome(workdir: Path, exported) -> None:
    """What the run measured, its warnings (stderr) and where its files are."""
    print(result_line(exported.report))
    best = exported.report["paper_protocol"]
    if best is not None:
        print(f"paper's protocol (best of {best['evaluations']} evaluations, chosen with the "
              f"target labels): {best['accuracy']:.4f} at step {best['best_step']}")
    for warning in exported.report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    plots = [workdir / name for name in ("training.png", "confusion.png") if (workdir / name).exists()]
    print(f"artifact {exported.artifact}; report {workdir / 'report.json'}; plots "
          f"{', '.join(map(str, plots)) or 'none'}{_not_measured(exported.report)}")


def result_line(report: dict) -> str:
    """The run's outcome in one line: what was measured on what, or that nothing was."""
    m = report["metrics"]
    changed = (f"dsp {m['dsp']}, nnz {m['nnz']} ({m['fraction_changed']:.4%} of encoder weights), "
               f"{m['skipped_files']} files skipped")
    if report["evaluated_on"] is None:
        return (f"task {report['task']}: target accuracy not measured (the target has no labels; "
                f"--target-eval DIR names a labelled split), {changed}")
    mean_class = m["mean_class_accuracy"]
    return (f"task {report['task']}: target accuracy {m['target_accuracy']:.4f} (mean per-class "
            f"{'n/a' if mean_class is None else f'{mean_class:.4f}'}) on {m['target_images']} "
            f"images of {report['evaluated_on']['what']} (measured on the exported residual), "
            f"{changed}")


def _not_measured(report: dict) -> str:
    return "" if report["evaluated_on"] is not None else "; target accuracy not measured (no target labels)"


def _publish(trainer: Trainer, exported) -> int:
    from trainer.export import publish, write_report

    task = trainer.cfg.task_name()
    try:
        info, url = publish(exported.blob, task, trainer.cfg.publish, exported.artifact,
                            allow_class_change=trainer.cfg.allow_class_change)
    except PublishError as e:
        exported.report["publish_error"] = str(e)
        write_report(Path(trainer.cfg.workdir), exported.report)
        return _fail(str(e), 1)
    print(f"published task {task} version {info.version} to {url}{_not_measured(exported.report)}")
    return 0


def check_store(cfg: TrainConfig) -> None:
    """--publish: the store answers and takes writes, before anything is scanned or trained."""
    if not cfg.publish:
        return
    from residual_store.stores import open_store, redact_url

    store = open_store(cfg.publish)
    try:
        store.check_writable()
    except ResidualStoreError as e:
        raise PublishError(f"--publish {redact_url(cfg.publish)}: {e}; fix the store (or leave "
                           "--publish out and publish later with uda-store import)") from e
    finally:
        store.close()


def check_task_contract(trainer: Trainer) -> None:
    """--publish: refuse now, not after training, to change a published task's classes or base."""
    cfg = trainer.cfg
    if not cfg.publish:
        return
    from residual_store.stores import open_store
    from residual_store.stores.contract import check_replacement

    metadata = {"classes": json.dumps(trainer.class_names), "base_model": trainer.spec.model,
                "base_pretrained": trainer.spec.pretrained_label,
                "base_fingerprint": trainer.base_fingerprint}
    store = open_store(cfg.publish)
    try:
        check_replacement(store, cfg.task_name(), metadata, cfg.allow_class_change)
    finally:
        store.close()


def dry_run(trainer: Trainer) -> int:
    cfg = trainer.cfg
    check_task_contract(trainer)
    plan = {
        "task": cfg.task_name(), "device": str(trainer.device), "family": trainer.family,
        "input_size": trainer.input_size, "classes": trainer.class_names,
        "source_images": len(trainer.source.files), "target_images": len(trainer.target.files),
        "target_labelled": trainer.target.labelled,
        "skipped_files": len(trainer.skipped), "ignored_files": trainer.ignored_files,
        "steps": cfg.total_steps if cfg.method != "zeroshot" else 0,
        "resume_from_step": trainer.step, "lr": cfg.lr, "head_lr": cfg.lr * cfg.head_lr_mult,
        "tau": cfg.tau if cfg.rst else None, "publish": cfg.publish,
        "evaluated_on": trainer.eval_description, "settings": cfg.settings(),
    }
    print(json.dumps(plan, indent=2))
    print("dry run: configuration, data and model are valid; nothing was trained")
    return 0


def _no_random_weights_warning(record: logging.LogRecord) -> bool:
    """open_clip warns "No pretrained weights loaded" at each build (the run builds the base
    twice); with --pretrained random that is what was asked for."""
    return not str(record.msg).startswith("No pretrained weights loaded")


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
