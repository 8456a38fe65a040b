"""The training recipe: `setup()` -> `train()` -> (export.py) -> `cleanup()`.

Per step (METHOD.md): the source batch, the target batch (weak view) and with FixMatch its
strong view each go through the network on their own, so the task head's BatchNorm normalises
each domain with its own statistics (as the authors' code does; batches of one image go
through together, BatchNorm needs two); L_cls on the source with label smoothing; for cmkd the
CMKD terms with the ramp lam(step / T_max); optionally FixMatch on the strong view. SGD (momentum 0.9, Nesterov, weight decay 5e-4) with the encoder at
lr and the head at lr * m, lr(x) = lr * (1 + 3e-4 x)^-0.75 per step; RST after every step.

Under torchrun each process trains on its own sample stream (seeded by the rank) with
--batch-size images per domain, gradients are averaged by DistributedDataParallel, and rank 0
writes logs and checkpoints; see trainer/cli.py and trainer/distributed.py.

Checkpoints are written at step boundaries only, Ctrl-C included (trainer/interrupt.py), so
--resume continues exactly where the checkpoint says.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from residual_store.base import BaseSpec, backbone_family, embed_dim, fingerprint, input_size
from residual_store.errors import one_line
from residual_store.flat import FlatParams
from residual_store.head import TaskHead
from trainer import checkpoint, data, distributed, metrics
from trainer.progress import ProgressLog
from trainer.cmkd import cmkd_loss, ramp
from trainer.config import TRAINING_FIELDS, TrainConfig
from trainer.errors import CheckpointError, ConfigError, TrainerError
from trainer.fixmatch import fixmatch_loss
from trainer.interrupt import StepBoundaryInterrupt
from trainer.network import (
    UdaNetwork,
    freeze_all_but_visual,
    freeze_head_bn_bias,
    logit_scale,
    text_features,
)
from trainer.rst import ResidualSparsifier

logger = logging.getLogger(__name__)

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LOG_FILE = "train_log.jsonl"


def lr_factor(step: int) -> float:
    """lr(x) / lr = (1 + 3e-4 x)^-0.75 (METHOD.md)."""
    return (1.0 + 3e-4 * step) ** -0.75


@dataclasses.dataclass
class TrainResult:
    steps: int  # global steps done when train() returned
    finished: bool  # False when stopped early by --stop-after
    train_seconds: float
    last_losses: dict[str, float]


class Trainer:
    """One run. Nothing heavy happens in __init__; call setup() first."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.step = 0
        self.checkpoint_step: int | None = None  # step of the last checkpoint written or loaded
        self.rank, self.world = 0, 1
        self.last_eval: dict[str, Any] | None = None  # the latest --eval-every result

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_distributed()
        self._setup_data()
        self._setup_model()
        if self.cfg.method != "zeroshot":
            self._setup_optimizer()
            if self.cfg.resume:
                self._load_checkpoint()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _setup_distributed(self) -> None:
        cfg = self.cfg
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(["--device cuda but no CUDA device is available: use --device cpu or auto"])
        self.world = distributed.world_size()
        self.rank, self.device = distributed.start(want_cuda)
        if cfg.amp and self.device.type != "cuda":
            logger.warning("--amp needs CUDA; training in float32 on %s", self.device)
        self.amp = cfg.amp and self.device.type == "cuda"
        torch.manual_seed(cfg.seed)

    def _setup_data(self) -> None:
        cfg = self.cfg
        src_dir, tgt_dir = cfg.domain_dirs()
        self.source, self.target = data.load_domains(src_dir, tgt_dir, cfg.workers)
        self.class_names = data.display_names(self.source.classes, cfg.classes_file)
        # the scan's, and then any file that fails later in training or evaluation
        self.skipped = self.source.skipped + self.target.skipped
        self.target_train_files = data.target_training_order(self.target)
        # what the target accuracy is measured on: None when no target labels exist
        self.eval_domain: data.Domain | None = self.target if self.target.labelled else None
        self.eval_description = f"--target {self.target.root}" if self.target.labelled else None
        if cfg.target_eval is not None:
            root, classes = data.class_folders(Path(cfg.target_eval), "--target-eval")
            data.check_same_classes(self.source.classes, classes)
            self.eval_domain = data.scan_domain(root, classes, "--target-eval", cfg.workers)
            self.skipped += self.eval_domain.skipped
            self.eval_description = f"--target-eval {root}"
        if self.eval_domain is None:
            logger.warning("the target %s is unlabelled: target accuracy will not be measured "
                           "(give a labelled split with --target-eval DIR to measure it)%s",
                           self.target.root, "; --eval-every evaluates nothing"
                           if cfg.eval_every else "")
        logger.info("source %s: %d images, target %s: %d images (%s), %d classes, %d files "
                    "skipped, %d non-image files ignored", src_dir, len(self.source.files), tgt_dir,
                    len(self.target.files), "labelled" if self.target.labelled else "unlabelled",
                    len(self.class_names), len(self.skipped), self.ignored_files)

    @property
    def ignored_files(self) -> int:
        """Files of the data folders that are not images by their extension."""
        domains = [self.source, self.target] + ([self.eval_domain] if self.eval_domain not in
                                                 (None, self.target) else [])
        return sum(d.ignored for d in domains)

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.spec = BaseSpec(cfg.model, cfg.pretrained, quick_gelu=cfg.quick_gelu)
        model = self.spec.build(self.device)
        self.family = backbone_family(model)
        self.cfg = cfg = cfg.resolve_defaults(self.family)
        self.input_size = input_size(model)
        self.embed_dim = embed_dim(model)
        self.text_features = text_features(model, self.spec.tokenizer(), self.class_names,
                                           cfg.prompt, self.device)
        self.logit_scale = logit_scale(model)
        freeze_all_but_visual(model)
        visual = model.visual.float()
        self.flat = FlatParams(visual)  # after the move and cast: .to() would detach the views
        self.w0 = self.flat.buffer.detach().clone()
        self.base_fingerprint = fingerprint(visual)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head = TaskHead(self.embed_dim, len(self.class_names)).to(self.device)
        freeze_head_bn_bias(head)
        self.net = UdaNetwork(visual, head, self.text_features, self.logit_scale).to(self.device)
        self.flat.check()
        del model  # only the encoder, head and text features stay: free the text tower
        self.ddp_net: nn.Module = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # The head's BatchNorm statistics stay each rank's own (rank 0's are exported); the
            # sync at init is harmless, every rank builds the same head from the same seed.
            self.ddp_net = DistributedDataParallel(self.net, device_ids=ids, forward_sync_buffers=False)
        self.sparsifier = ResidualSparsifier(self.flat, cfg.tau, w0=self.w0) if cfg.rst else None

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.SGD(
            [{"params": [p for p in self.net.visual.parameters() if p.requires_grad], "lr": cfg.lr},
             {"params": [p for p in self.net.head.parameters() if p.requires_grad],
              "lr": cfg.lr * cfg.head_lr_mult}],
            momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.workdir) / checkpoint.FILENAME

    def _checkpoint_state(self) -> dict[str, Any]:
        config = self.cfg.to_dict()
        return {
            "step": self.step,
            "config": {k: config[k] for k in TRAINING_FIELDS},
            "run": self._run_identity,
            "data_files": self._data_files,
            "base_fingerprint": self.base_fingerprint,
            "encoder": self.flat.buffer.detach().cpu().clone(),
            "head": self.net.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": checkpoint.rng_states(),
        }

    def save_checkpoint(self) -> None:
        """Call at step boundaries only: the state must be that of a whole number of steps."""
        if self.is_main:
            checkpoint.save(self.checkpoint_path, self._checkpoint_state())
        self.checkpoint_step = self.step

    @functools.cached_property
    def _run_identity(self) -> dict[str, Any]:
        """What besides the flags makes a resumed run train the same weights: the images (by
        content) and their labels, the class names the prompts use, and the process count
        (it sets each rank's sample stream). Fixed once set up: computed once, not per
        checkpoint."""
        data_digest = hashlib.sha256()
        for domain in (self.source, self.target):
            labels = domain.labels or [None] * len(domain.digests)
            for digest, label in zip(domain.digests, labels):
                data_digest.update(f"{digest}:{label}\n".encode())
            data_digest.update(b"--\n")
        return {"classes": list(self.class_names), "data_sha256": data_digest.hexdigest(),
                "world": self.world}

    @functools.cached_property
    def _data_files(self) -> dict[str, dict[str, str]]:
        """domain -> {path relative to the domain folder: sha256}: what a changed dataset
        blocking --resume is described with (files added, removed, changed)."""
        return {name: {str(f.relative_to(d.root)): digest for f, digest in zip(d.files, d.digests)}
                for name, d in (("source", self.source), ("target", self.target))}

    def _data_change(self, saved: dict[str, Any]) -> str:
        """What changed in the images since the checkpoint `saved`, e.g. "source: 2 added, 0
        removed, 1 changed" (from the file list checkpoints record since issue 23)."""
        old_files = saved.get("data_files")
        if not isinstance(old_files, dict):
            return "the images or their labels changed"
        parts = []
        for name, now in self._data_files.items():
            before = old_files.get(name, {})
            added = len(now.keys() - before.keys())
            removed = len(before.keys() - now.keys())
            modified = sum(1 for k in now.keys() & before.keys() if now[k] != before[k])
            if added or removed or modified:
                parts.append(f"{name}: {added} added, {removed} removed, {modified} changed")
        return "; ".join(parts) or "the labels or the order of the images changed"

    def _load_checkpoint(self) -> None:
        state = checkpoint.load(self.checkpoint_path)
        changed = checkpoint.config_differences(state.get("config", {}), self.cfg.to_dict(),
                                                TRAINING_FIELDS)
        if "run" in state:  # checkpoints from before the run identity was recorded lack it
            now = self._run_identity
            for k, v in now.items():
                if state["run"].get(k) == v:
                    continue
                if k == "data_sha256":
                    if self.cfg.allow_data_change:
                        logger.warning("--allow-data-change: resuming with changed images (%s)",
                                       self._data_change(state))
                        continue
                    changed.append(f"the images changed ({self._data_change(state)}): "
                                   "--allow-data-change resumes with them on purpose")
                else:
                    changed.append(f"{k}: {_short(state['run'].get(k))} -> {_short(v)}")
        if changed:
            raise CheckpointError(f"{self.checkpoint_path} was written with other settings "
                                  f"({'; '.join(changed)}): use the same flags, or start a new "
                                  "--workdir without --resume")
        if state.get("base_fingerprint") != self.base_fingerprint:
            raise CheckpointError(f"{self.checkpoint_path} belongs to another base model "
                                  f"(fingerprint {str(state.get('base_fingerprint'))[:12]}, this "
                                  f"base is {self.base_fingerprint[:12]})")
        try:
            with torch.no_grad():
                self.flat.buffer.copy_(state["encoder"].to(self.device))
            self.net.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            checkpoint.set_rng_states(state["rng"])
            self.step = self.checkpoint_step = int(state["step"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.checkpoint_path} does not fit this run ({one_line(e, 200)}): "
                                  "start a new --workdir without --resume") from e
        logger.info("resumed from %s at step %d", self.checkpoint_path, self.step)

    # -- training ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg
        started = time.perf_counter()
        last: dict[str, float] = {}
        if cfg.method == "zeroshot":
            return TrainResult(0, True, 0.0, last)
        stop = min(cfg.stop_after or cfg.total_steps, cfg.total_steps)
        log = self._open_log()
        try:
            with StepBoundaryInterrupt() as interrupt:
                while self.step < stop:
                    epoch = self.step // cfg.iters_per_epoch
                    end = min((epoch + 1) * cfg.iters_per_epoch, stop)
                    last = self._run_epoch(epoch, self.step, end, log, interrupt)
                    if self.step % cfg.iters_per_epoch == 0 or self.step == stop:
                        self.save_checkpoint()
        finally:
            if log is not None:
                log.close()
        return TrainResult(self.step, self.step >= cfg.total_steps, time.perf_counter() - started, last)

    def _open_log(self):
        if not self.is_main:
            return None
        path = Path(self.cfg.workdir) / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run drops the lines of steps it will redo, so the log reads as one run.
        kept = []
        if self.step and path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")

    def _loaders(self, start: int, end: int):
        cfg, size = self.cfg, self.input_size
        pin = self.device.type == "cuda"
        stream = self.rank
        weak = data.train_transform(size, cfg.hflip, cfg.crop, cfg.resolved_crop_scale)
        src = data.TrainImages(self.source.files, self.source.labels, [weak])
        src_sampler = data.StepSampler(len(src), cfg.batch_size, cfg.seed, data.SOURCE, start, end, stream)
        loaders = [data.step_loader(src, src_sampler, cfg.workers, pin)]
        if cfg.method == "cmkd":
            views = [weak]
            if cfg.fixmatch:
                views.append(data.strong_transform(size, cfg.hflip, cfg.crop))
            tgt = data.TrainImages(self.target_train_files, None, views)
            tgt_sampler = data.StepSampler(len(tgt), cfg.batch_size, cfg.seed, data.TARGET, start, end, stream)
            loaders.append(data.step_loader(tgt, tgt_sampler, cfg.workers, pin))
        return loaders

    def _run_epoch(self, epoch: int, start: int, end: int, log,
                   interrupt: StepBoundaryInterrupt) -> dict[str, float]:
        cfg = self.cfg
        loaders = self._loaders(start, end)
        sums: dict[str, float] = {}
        steps = zip(*(data.readable_batches(loader, self.skipped) for loader in loaders))
        bar = tqdm(steps, total=end - start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   initial=0, disable=None if self.is_main else True, leave=True)
        progress = self.progress if self.is_main and bar.disable else None
        losses: dict[str, float] = {}
        for n, batches in enumerate(bar, start=1):
            losses = self.train_step(batches)
            finite = all(map(_finite, losses.values()))
            # every rank takes the same branch, or the others would wait for it in the next step
            not_finite, interrupted = distributed.any_rank([not finite, interrupt.requested], self.device)
            if not_finite:  # the last checkpoint stays the good one
                where = "" if not finite else " on another process"
                raise TrainerError(f"loss is not finite at step {self.step}{where} ({losses}): "
                                   "lower --lr or --head-lr-mult")
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            shown = {k: f"{v / n:.4f}" for k, v in sums.items() if k != "nnz"}
            if "nnz" in losses:  # a count now, not a mean
                shown["nnz"] = str(int(losses["nnz"]))
            bar.set_postfix(shown, refresh=False)
            if log is not None:
                log.write(json.dumps({"step": self.step, "epoch": epoch, **losses}) + "\n")
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._evaluate_during_training(log, bar)
                log.flush()
            if progress is not None:
                progress.step(self.step, losses, self.last_eval)
            if interrupted:
                self.save_checkpoint()
                raise KeyboardInterrupt
            if self.step % cfg.checkpoint_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        return losses

    @functools.cached_property
    def progress(self) -> ProgressLog:
        return ProgressLog(self.cfg.total_steps, self.cfg.log_every, start_step=self.step)

    def _evaluate_during_training(self, log, bar) -> None:
        """--eval-every: the in-memory model on the evaluation set, one log line (rank 0 only:
        the other ranks go on to the next step's all-reduce and wait for it there)."""
        if self.eval_domain is None:  # unlabelled: setup() said so once
            return
        logits, labels = self.predict_labelled(self.target_eval_loader())
        summary = metrics.classification_summary(logits, labels, self.class_names)
        self.last_eval = {"accuracy": summary["accuracy"],
                          "mean_class_accuracy": summary["mean_class_accuracy"]}
        log.write(json.dumps({"step": self.step, "eval": self.last_eval}) + "\n")
        if not bar.disable:
            bar.write(f"step {self.step}: target accuracy {_percent(summary['accuracy'])}, "
                      f"mean per-class {_percent(summary['mean_class_accuracy'])}")

    def train_step(self, batches) -> dict[str, float]:
        """One optimiser step (forward, losses, backward, SGD, scheduler, RST) on loaded batches:
        `batches[0]` = (source images, labels), and for cmkd `batches[1]` = the target views
        (weak, then strong with --fixmatch). Returns the step's losses (the caller checks they
        are finite, together with the other ranks), lr, ramp value and, with RST, the number of
        encoder weights that differ from the pre-trained ones after the step."""
        cfg = self.cfg
        self.ddp_net.train()  # predict() may have left it in eval mode
        lam = ramp(self.step, cfg.ramp_steps, cfg.gamma)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        xs, ys = batches[0][0].to(self.device, non_blocking=True), batches[0][1].to(self.device)
        parts = [xs]
        if cfg.method == "cmkd":
            parts += [t.to(self.device, non_blocking=True) for t in batches[1]]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            if xs.shape[0] > 1:  # each domain alone: its own BatchNorm statistics in the head
                outputs = self.ddp_net(parts)
            else:  # BatchNorm cannot normalise one image: the domains go through together
                logits, clip = self.ddp_net(torch.cat(parts))
                outputs = list(zip(logits.split(xs.shape[0]), clip.split(xs.shape[0])))
        logits_s, *logits_t = [pair[0].float() for pair in outputs]
        clip_s, *clip_t = [pair[1].float() for pair in outputs]
        loss_cls = F.cross_entropy(logits_s, ys, label_smoothing=cfg.label_smoothing)
        total = loss_cls
        out = {"cls": loss_cls}
        if cfg.method == "cmkd":
            terms = cmkd_loss(logits_t[0], clip_t[0], clip_s, ys, lam, cfg.lambda1, cfg.lambda2,
                              cfg.lambda3, cfg.alpha, cfg.alpha_value, cfg.task_weight,
                              cfg.distill_weight)
            out.update(task=terms["task"], distill=terms["distill"], reg=terms["reg"])
            total = total + terms["total"]
            if cfg.fixmatch:
                out["fixmatch"] = fixmatch_loss(logits_t[0], logits_t[1], clip_t[0], clip_t[1],
                                                cfg.fixmatch_threshold, cfg.fixmatch_weight)
                total = total + out["fixmatch"]
        out["total"] = total
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        extra: dict[str, float] = {}
        if self.sparsifier is not None:
            extra["nnz"] = self.sparsifier.step()
        self.step += 1
        values = {k: float(v.detach()) for k, v in out.items()}
        return {**values, "lr": lrs[0], "head_lr": lrs[1], "ramp": lam, **extra}

    # -- evaluation ----------------------------------------------------------------------------

    def predict(self, loader) -> torch.Tensor:
        """Task-head logits of the in-memory model (eval mode) for every readable image of
        `loader` (an eval_loader); files that fail are added to the run's skipped files."""
        return self.predict_labelled(loader)[0]

    @torch.no_grad()
    def predict_labelled(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of predict(), the labels of exactly the images that were read."""
        self.net.eval()
        logits, labels = [torch.empty(0, len(self.class_names))], [torch.empty(0, dtype=torch.long)]
        for x, y in data.readable_batches(loader, self.skipped):
            logits.append(self.net(x.to(self.device))[0].float().cpu())
            labels.append(y)
        return torch.cat(logits), torch.cat(labels)

    def target_eval_loader(self):
        """The evaluation set (--target-eval, else the labelled target) with the serving
        transform; only when there is one (eval_domain is not None)."""
        if self.eval_domain is None:
            raise TrainerError("no labelled evaluation set: the target is unlabelled and no "
                               "--target-eval was given")
        return data.eval_loader(self.eval_domain, self.input_size, self.cfg.eval_batch_size, self.cfg.workers)

    def cleanup(self) -> None:
        distributed.stop()


def _logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; inf (dropped on resume) for a line torn by a kill
    mid-write: it is always the last one, of a step after the checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _short(value: Any) -> str:
    """A checkpoint value fit for a one-line error (class lists and digests get long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
