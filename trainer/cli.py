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
from residual_store.settings import add_arguments, given_names, values_from_args
from trainer.config import GROUPS, TrainConfig
from trainer import checkpoint

if TYPE_CHECKING:
    from trainer.loop import Trainer
from trainer.errors import CheckpointError, ConfigError, DataError, PublishError, TrainerError

PROG = "uda-train"
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Adapt a CLIP image encoder to a target "
                                "domain with CMKD (+ RST) and publish the residual.")
    groups = add_arguments(p, TrainConfig, GROUPS)
    groups["execution"].add_argument("--verbose", "-v", action="store_true", help="log progress details")
    return p


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The settings the command line names explicitly (they override a --preset)."""
    return given_names(build_parser(), argv)


def config_from_args(args: argparse.Namespace, given: set[str] | None = None) -> TrainConfig:
    """`given`: the flags named on the command line (None: all of them, as from a script)."""
    problems: list[str] = []  # uda-train's conversions (tuple, "none" weights) cannot fail
    return TrainConfig.from_settings(values_from_args(TrainConfig, args, problems, only=given))


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
