"""Export, evaluate and publish: what is published is what was measured.

1. The residual (w - w0 where it is non-zero, plus the dense head) is extracted with
   residual_store, serialised and validated (from_bytes + check_compatible), and written to
   workdir/residual.safetensors.
2. The final evaluation loads THAT FILE onto a freshly built base (BaseSpec.build, FlatParams,
   apply_residual, residual.build_head) and measures target accuracy with the evaluation
   transform the server uses, so served predictions equal the measured ones.
3. The metrics go into the residual's metadata (same tensors) and workdir/report.json; the
   file is published to the store when asked. An unreachable store leaves the artifact saved
   and says how to publish it later.
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
from residual_store.flat import FlatParams
from residual_store.head import CosineHead
from residual_store.numerics import fp32_precision
from residual_store.residual import Residual, check_compatible, extract, from_bytes, make_residual, to_bytes
from residual_store.swap import apply_residual
from trainer import data
from trainer.errors import PublishError
from trainer.loop import Trainer, TrainResult

logger = logging.getLogger(__name__)

ARTIFACT = "residual.safetensors"
REPORT = "report.json"


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
        config=trainer.cfg.to_dict())


def validated_bytes(residual: Residual, trainer: Trainer) -> bytes:
    """Serialise and check the bytes the way a server would before accepting them."""
    blob = to_bytes(residual)
    check_compatible(from_bytes(blob), trainer.flat.layout, trainer.base_fingerprint, trainer.embed_dim)
    return blob


@torch.no_grad()
def evaluate_artifact(blob: bytes, spec: BaseSpec, domain: data.Domain, size: int,
                      device: torch.device, batch_size: int = 64, workers: int = 0,
                      skipped: list[data.Skipped] | None = None) -> Evaluation:
    """Load the exported residual onto a freshly built base and predict every target image.

    An image that cannot be read any more is left out and appended to `skipped` (the run's
    list, so a file that already failed in training is not reported twice).
    """
    with fp32_precision("ieee"):  # what the server computes: no TF32 convolutions on a GPU
        started = time.perf_counter()
        model = spec.build(device)
        visual = model.visual.float()
        del model
        flat = FlatParams(visual)
        residual = from_bytes(blob)
        check_compatible(residual, flat.layout, fingerprint(visual), embed_dim_of(visual))
        apply_residual(flat.buffer, residual.to_flat(flat.layout, flat.buffer.dtype, device))
        head = residual.build_head().to(device)
        logits, labels = [], []
        loader = data.eval_loader(domain, size, batch_size, workers)
        for x, y in data.readable_batches(loader, [] if skipped is None else skipped):
            logits.append(head(visual(x.to(device))).float().cpu())
            labels.append(y)
        if not logits:  # every target image broke after the scan: accuracy is nan, not a crash
            logits, labels = [torch.empty(0, len(residual.classes))], [torch.empty(0, dtype=torch.long)]
        return Evaluation(torch.cat(logits), torch.cat(labels), time.perf_counter() - started)


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
    evaluation = evaluate_artifact(artifact.read_bytes(), trainer.spec, trainer.target,
                                   trainer.input_size, trainer.device, cfg.eval_batch_size, cfg.workers,
                                   trainer.skipped)
    encoder_params = trainer.flat.layout.numel
    metrics = {
        "target_accuracy": evaluation.accuracy,
        "target_images": len(evaluation.labels),
        "source_images": len(trainer.source.files),
        "dsp": residual.dsp,
        "nnz": residual.nnz,
        "encoder_params": encoder_params,
        "fraction_changed": residual.nnz / encoder_params,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 3),
        "eval_seconds": round(evaluation.seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "skipped_files": len(trainer.skipped),
        "method": cfg.method,
        "rst": cfg.rst,
    }
    residual.metadata["metrics"] = json.dumps(metrics, sort_keys=True)
    blob = validated_bytes(residual, trainer)
    write_atomic(artifact, blob)
    report = {
        "task": cfg.task_name(),
        "artifact": str(artifact),
        "classes": trainer.class_names,
        "metrics": metrics,
        "last_losses": result.last_losses,
        "skipped": [dataclasses.asdict(s) for s in trainer.skipped],
        "base": {"model": trainer.spec.model, "pretrained": trainer.spec.pretrained_label,
                 "fingerprint": trainer.base_fingerprint},
        "config": cfg.to_dict(),
    }
    write_report(workdir, report)
    return ExportResult(artifact, report, blob)


def write_report(workdir: Path, report: dict[str, Any]) -> None:
    write_atomic(workdir / REPORT, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())


def publish(blob: bytes, task: str, url: str, artifact: Path):
    """Publish atomically; PublishError (artifact kept) with the command to retry later."""
    from residual_store.stores import open_store, redact_url

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
    try:
        return store.publish(task, blob), store.url
    except (ResidualStoreError, OSError, ValueError) as e:
        raise PublishError(f"could not publish to {shown}: {one_line(e)}. The residual is saved "
                           f"at {artifact}; publish it later with: {later}") from e
    finally:
        store.close()
