"""Export, evaluate and publish: what is published is what was measured.

1. The residual (w - w0 where it is non-zero, plus the dense head) is extracted with
   residual_store, serialised and validated (from_bytes + check_compatible), and written to
   workdir/residual.safetensors.
2. The final evaluation loads THAT FILE onto a freshly built base (BaseSpec.build, FlatParams,
   apply_residual, residual.build_head) and measures target accuracy with the evaluation
   transform the server uses, so served predictions equal the measured ones.
3. The metrics go into the residual's metadata (same tensors) and workdir/report.json: the
   honest number (the exported residual, last step), overall and mean per-class accuracy,
   per-class accuracy and the confusion matrix; with --eval-every also the best step, labelled
   as the paper's protocol (it picks the step by target labels). training.png and
   confusion.png go beside it. The file is published to the store when asked. An unreachable
   store leaves the artifact saved and says how to publish it later.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from residual_store.atomic import atomic_write
from residual_store.base import BaseSpec, fingerprint
from residual_store.errors import ResidualStoreError, one_line
from residual_store.flat import ParamLayout
from residual_store.head import CosineHead
from residual_store.numerics import fp32_precision
from residual_store.precision import ACCURACY_KEY, AGREEMENT_KEY, PRECISIONS, encode, served_weights
from residual_store.residual import (FlatResidual, Residual, check_compatible, extract, from_bytes,
                                     make_residual, to_bytes)
from residual_store.swap import apply_residual, apply_targets
from trainer import data, metrics
from trainer.config import TrainConfig
from trainer.errors import PublishError
from trainer.loop import LOG_FILE, Trainer, TrainResult

logger = logging.getLogger(__name__)

ARTIFACT = "residual.safetensors"
REPORT = "report.json"
TRAINING_PLOT = "training.png"
CONFUSION_PLOT = "confusion.png"
NOT_MEASURED = ("target accuracy was not measured: the target has no labels (a flat folder, or "
                "folders that are not the source's classes) and no --target-eval DIR was given")
PAPER_PROTOCOL = ("the best of the --eval-every evaluations, chosen with the target labels as "
                  "the paper's code does (it saves the best epoch); the exported residual is the "
                  "last step's, whose accuracy is metrics.target_accuracy")


@dataclasses.dataclass
class Evaluation:
    logits: torch.Tensor  # task-head logits of every target image, in Domain.files order
    labels: torch.Tensor
    seconds: float

    @property
    def accuracy(self) -> float:
        if not len(self.labels):
            return float("nan")
        return float((self.logits.argmax(dim=1) == self.labels).float().mean())


def build_residual(trainer: Trainer, metrics: dict[str, Any] | None = None) -> Residual:
    """The trained run as a residual (zeroshot: an empty one with the CLIP cosine head)."""
    if trainer.cfg.method == "zeroshot":
        deltas: dict = {}
        head: torch.nn.Module = CosineHead.from_text_features(trainer.text_features.cpu(), trainer.logit_scale)
    else:
        layout = trainer.flat.layout
        base = {s.name: trainer.w0[s.offset:s.offset + s.numel].view(s.shape) for s in layout.slots}
        tuned = dict(trainer.net.visual.named_parameters())
        deltas = extract(base, tuned)
        head = trainer.net.head
    return make_residual(
        deltas, head, task=trainer.cfg.task_name(), classes=trainer.class_names,
        base_model=trainer.spec.model, base_pretrained=trainer.spec.pretrained_label,
        base_fingerprint=trainer.base_fingerprint, metrics=metrics,
        config=trainer.cfg.to_dict(), base_activation=trainer.spec.activation())


def validated_bytes(residual: Residual, trainer: Trainer) -> bytes:
    """Serialise and check the bytes the way a server would before accepting them."""
    blob = to_bytes(residual)
    check_compatible(from_bytes(blob), trainer.flat.layout, trainer.base_fingerprint, trainer.embed_dim)
    return blob


@torch.no_grad()
def evaluate_artifact(blob: bytes, spec: BaseSpec, domain: data.Domain, size: int,
                      device: torch.device, batch_size: int = 64, workers: int = 0,
                      skipped: list[data.Skipped] | None = None, precision: str = "fp32") -> Evaluation:
    """Load the exported residual onto a freshly built base and predict every target image,
    with the weights in `precision` as `uda-serve --precision` serves them.

    An image that cannot be read any more is left out and appended to `skipped` (the run's
    list, so a file that already failed in training is not reported twice).
    """
    with fp32_precision("ieee"):  # what the server computes: no TF32 convolutions on a GPU
        started = time.perf_counter()
        model = spec.build(device)
        visual = model.visual.float()
        del model
        residual = from_bytes(blob)
        check_compatible(residual, ParamLayout.of(visual), fingerprint(visual), embed_dim_of(visual))
        weights = served_weights(visual, precision)
        resident = weights.resident(residual.to_flat(weights.layout))
        apply = apply_residual if weights.exact else apply_targets
        apply(weights.flat.buffer, FlatResidual(resident.index.to(device), resident.values.to(device)))
        head = residual.build_head().to(device)
        logits, labels = [], []
        loader = data.eval_loader(domain, size, batch_size, workers)
        for x, y in data.readable_batches(loader, [] if skipped is None else skipped):
            logits.append(head(encode(visual, x.to(device), weights.dtype)).float().cpu())
            labels.append(y)
        if not logits:  # every target image broke after the scan: accuracy is nan, not a crash
            logits, labels = [torch.empty(0, len(residual.classes))], [torch.empty(0, dtype=torch.long)]
        return Evaluation(torch.cat(logits), torch.cat(labels), time.perf_counter() - started)


def precision_record(blob: bytes, trainer: Trainer, fp32: Evaluation
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Target accuracy of the artifact in every serving precision, and the share of its top-1
    predictions equal to fp32's: ({precision: accuracy}, {precision: agreement})."""
    accuracy, agreement = {"fp32": fp32.accuracy}, {}
    for precision in PRECISIONS[1:]:
        other = evaluate_artifact(blob, trainer.spec, trainer.eval_domain, trainer.input_size,
                                  trainer.device, trainer.cfg.eval_batch_size, trainer.cfg.workers,
                                  list(trainer.skipped), precision)  # a copy: warned once
        accuracy[precision] = other.accuracy
        same = other.logits.argmax(1) == fp32.logits.argmax(1)
        agreement[precision] = float(same.float().mean()) if len(same) == len(fp32.labels) else None
        logger.info("target accuracy in %s: %.2f%% (fp32 %.2f%%), top-1 agreement %s", precision,
                    100 * other.accuracy, 100 * fp32.accuracy, agreement[precision])
    return accuracy, agreement


def embed_dim_of(visual: torch.nn.Module) -> int:
    return int(visual.output_dim)


def write_atomic(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, blob)


@dataclasses.dataclass
class ExportResult:
    artifact: Path
    report: dict[str, Any]
    blob: bytes


def export(trainer: Trainer, result: TrainResult, wall_start: float) -> ExportResult:
    """Write the artifact, evaluate it on a fresh base, record metrics; returns the final blob."""
    cfg = trainer.cfg
    workdir = Path(cfg.workdir)
    artifact = workdir / ARTIFACT
    residual = build_residual(trainer)
    write_atomic(artifact, validated_bytes(residual, trainer))
    logger.info("residual written to %s: %d changed encoder weights", artifact, residual.nnz)
    measured = measure(trainer, artifact)
    scores = run_scores(trainer, result, residual, measured, wall_start)
    residual.metadata["metrics"] = json.dumps(scores, sort_keys=True)
    blob = validated_bytes(residual, trainer)
    write_atomic(artifact, blob)
    records = read_log(workdir / LOG_FILE)
    report = {
        "task": cfg.task_name(),
        "artifact": str(artifact),
        "classes": trainer.class_names,
        "metrics": scores,
        "evaluated_on": measured.evaluated_on,
        "per_class": measured.summary["per_class"],
        "confusion": measured.summary["confusion"],
        "paper_protocol": best_step(records),
        "warnings": run_warnings(cfg, residual, measured),
        "last_losses": result.last_losses,
        "skipped": [dataclasses.asdict(s) for s in trainer.skipped],
        "base": {"model": trainer.spec.model, "pretrained": trainer.spec.pretrained_label,
                 "fingerprint": trainer.base_fingerprint},
        "config": cfg.to_dict(),
        "settings": cfg.settings(),
    }
    write_report(workdir, report)
    write_plots(workdir, records, measured.summary["confusion"] or [], trainer.class_names,
                cfg.task_name())
    return ExportResult(artifact, report, blob)


@dataclasses.dataclass
class Measured:
    """What evaluating the exported artifact found (all None/0 when nothing was measured)."""

    summary: dict[str, Any]  # metrics.classification_summary
    accuracy: float | None = None
    evaluated: int = 0  # images evaluated
    eval_seconds: float = 0.0
    by_precision: dict[str, Any] | None = None  # precision_record
    agreement: Any = None
    evaluated_on: dict[str, Any] | None = None  # what was evaluated; None: nothing


def measure(trainer: Trainer, artifact: Path) -> Measured:
    """The written artifact evaluated on a fresh base, as uda-serve would serve it."""
    if trainer.eval_domain is None:  # an unlabelled target and no --target-eval
        return Measured({"mean_class_accuracy": None, "per_class": None, "confusion": None})
    cfg = trainer.cfg
    evaluation = evaluate_artifact(artifact.read_bytes(), trainer.spec, trainer.eval_domain,
                                   trainer.input_size, trainer.device, cfg.eval_batch_size,
                                   cfg.workers, trainer.skipped)
    summary = metrics.classification_summary(evaluation.logits, evaluation.labels,
                                             trainer.class_names)
    by_precision, agreement = precision_record(artifact.read_bytes(), trainer, evaluation)
    evaluated_on = {"what": trainer.eval_description, "images": len(evaluation.labels),
                    "note": "the exported residual on a fresh base, serving transform"}
    return Measured(summary, evaluation.accuracy, len(evaluation.labels), evaluation.seconds,
                    by_precision, agreement, evaluated_on)


def run_warnings(cfg: TrainConfig, residual: Residual, measured: Measured) -> list[str]:
    """What report.json and the end of the run warn about."""
    warnings = []
    if measured.evaluated_on is None:
        warnings.append(NOT_MEASURED)
    if cfg.rst and residual.nnz == 0:
        logger.warning("RST kept no change of the image encoder (tau %g): the residual is only a "
                       "task head; raise --lr or lower --tau", cfg.tau)
        warnings.append("RST kept no change of the image encoder: the residual is only a task "
                        "head; raise --lr or lower --tau")
    return warnings


def run_scores(trainer: Trainer, result: TrainResult, residual: Residual, measured: Measured,
               wall_start: float) -> dict[str, Any]:
    """The metrics stored in the residual's metadata and report.json."""
    cfg, encoder_params = trainer.cfg, trainer.flat.layout.numel
    return {
        "target_accuracy": measured.accuracy,
        "target_accuracy_note": None if measured.evaluated_on is not None else NOT_MEASURED,
        "mean_class_accuracy": measured.summary["mean_class_accuracy"],
        "target_images": measured.evaluated,
        ACCURACY_KEY: measured.by_precision,  # what uda-serve --precision bf16 checks before serving
        AGREEMENT_KEY: measured.agreement,
        "target_train_images": len(trainer.target.files),
        "source_images": len(trainer.source.files),
        "dsp": residual.dsp,
        "nnz": residual.nnz,
        "encoder_params": encoder_params,
        "fraction_changed": residual.nnz / encoder_params,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 3),
        "eval_seconds": round(measured.eval_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "skipped_files": len(trainer.skipped),
        "ignored_files": trainer.ignored_files,
        "method": cfg.method,
        "rst": cfg.rst,
    }


def read_log(path: Path) -> list[dict[str, Any]]:
    """The lines of train_log.jsonl that parse (a zeroshot run has none)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def best_step(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The --eval-every evaluation with the highest accuracy (the paper's protocol), or None."""
    evals = [r for r in records if isinstance(r.get("eval"), dict)
             and r["eval"].get("accuracy") is not None]
    if not evals:
        return None
    best = max(evals, key=lambda r: (r["eval"]["accuracy"], -r["step"]))
    return {"best_step": best["step"], "accuracy": best["eval"]["accuracy"],
            "mean_class_accuracy": best["eval"].get("mean_class_accuracy"),
            "evaluations": len(evals), "note": PAPER_PROTOCOL}


def write_plots(workdir: Path, records: list[dict[str, Any]], confusion: list[list[int]],
                class_names: list[str], title: str) -> None:
    """training.png and confusion.png; a plot that fails is a warning, never a failed run."""
    from trainer import plots

    if records:  # a zeroshot run trains nothing
        _draw(plots.plot_training, records, workdir / TRAINING_PLOT, title=title)
    if confusion:
        _draw(plots.plot_confusion, confusion, class_names, workdir / CONFUSION_PLOT, title=title)


def _draw(plot, *args, **kwargs) -> None:
    try:
        plot(*args, **kwargs)
    except Exception as e:  # matplotlib raises many kinds; the run's results stand
        logger.warning("could not draw %s: %s", args[-1], one_line(e))


def write_report(workdir: Path, report: dict[str, Any]) -> None:
    write_atomic(workdir / REPORT, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())


def publish(blob: bytes, task: str, url: str, artifact: Path, allow_class_change: bool = False):
    """Publish atomically; PublishError (artifact kept) with the command to retry later. A
    publish that would change the task's classes or base is refused unless allowed."""
    from residual_store.residual import inspect_blob
    from residual_store.stores import open_store, redact_url
    from residual_store.stores.contract import check_replacement

    # Messages land on stderr and in report.json: the password stays out of both.
    shown = redact_url(url)
    bare = redact_url(url, mask=None)
    later = f"uda-store import {artifact} --task {task} --store {bare}"
    if bare != url:
        later = f"REDIS_PASSWORD=... {later}"
    try:
        store = open_store(url)
    except (ResidualStoreError, ValueError, OSError) as e:
        raise PublishError(f"could not open store {shown}: {one_line(e).replace(url, shown)}. The "
                           f"residual is saved at {artifact}; publish it later with: {later}") from e
    if allow_class_change:
        later += " --allow-class-change"
    try:
        check_replacement(store, task, inspect_blob(blob), allow_class_change)
        return store.publish(task, blob), store.url
    except (ResidualStoreError, OSError, ValueError) as e:
        raise PublishError(f"could not publish to {shown}: {one_line(e)}. The residual is saved "
                           f"at {artifact}; publish it later with: {later}") from e
    finally:
        store.close()
