"""The training configuration: every `uda-train` flag as one dataclass, validated at once.

Backbone-dependent defaults (METHOD.md, "Optimisation") are left as None here and filled by
`resolve_defaults` once the model's family is known:

    family   lr     head-lr multiplier m   tau
    vit      3e-6   1000                   1e-6
    resnet   3e-7   10000                  1e-5
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from residual_store.errors import InvalidTaskName, ResidualStoreError, one_line
from residual_store.stores import open_store, redact_url, validate_task_name
from trainer.errors import ConfigError

Method = Literal["cmkd", "baseline", "zeroshot"]
Device = Literal["auto", "cpu", "cuda"]
METHODS = ("cmkd", "baseline", "zeroshot")
DEVICES = ("auto", "cpu", "cuda")

FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "vit": {"lr": 3e-6, "head_lr_mult": 1000.0, "tau": 1e-6},
    "resnet": {"lr": 3e-7, "head_lr_mult": 10000.0, "tau": 1e-5},
}

# Fields whose value changes the trained weights: a checkpoint only resumes under the same ones.
TRAINING_FIELDS = ("model", "pretrained", "method", "rst", "tau", "fixmatch", "epochs",
                   "iters_per_epoch", "batch_size", "lr", "head_lr_mult", "seed", "prompt",
                   "label_smoothing", "lambda1", "lambda2", "lambda3", "gamma", "ramp_max_steps",
                   "fixmatch_threshold", "amp")


@dataclasses.dataclass
class TrainConfig:
    """One `uda-train` run. Paths are as given; `validate()` checks them exist."""

    # data: either source/target folders, or data_root with two domain names
    source: Path | None = None  # labelled source domain, ImageFolder layout DIR/<class>/<image>
    target: Path | None = None  # unlabelled target domain (labels used only for evaluation)
    data_root: Path | None = None  # dataset root holding one folder per domain (Office-Home...)
    source_domain: str | None = None  # folder name of the source domain under data_root
    target_domain: str | None = None  # folder name of the target domain under data_root
    classes_file: Path | None = None  # display names, one per line, in sorted class-folder order
    prompt: str = "a photo of a {}."  # CLIP prompt template; "{}" is replaced by the class name

    # model
    model: str = "ViT-B-16"  # open_clip model name or model-config JSON path
    pretrained: str | None = "openai"  # pretrained tag, local checkpoint, or None/"random"

    # method
    method: Method = "cmkd"  # cmkd | baseline (source only) | zeroshot (trains nothing)
    rst: bool = False  # Residual Sparse Training: reset |w - w0| <= tau to w0 after each step
    tau: float | None = None  # RST threshold; None: 1e-6 (ViT) / 1e-5 (ResNet)
    fixmatch: bool = False  # add METHOD.md's optional FixMatch term (cmkd only)
    fixmatch_threshold: float = 0.95  # confidence needed to keep a pseudo-label
    label_smoothing: float = 0.1  # on L_cls
    lambda1: float = 0.25  # weight of L_task and L_distill
    lambda2: float = 0.1  # weight of the CLIP head's source CE in L_reg
    lambda3: float = 0.025  # weight of the CLIP head's Gini impurity in L_reg
    gamma: float = 1.0  # ramp steepness
    ramp_max_steps: int | None = None  # ramp T_max; None: epochs * iters_per_epoch (this run)

    # optimisation
    epochs: int = 20  # METHOD.md: 20
    iters_per_epoch: int = 500  # METHOD.md: 500 (digits: 1000)
    batch_size: int = 32  # images per domain per step (and per process under torchrun)
    lr: float | None = None  # image-encoder learning rate; None: 3e-6 (ViT) / 3e-7 (ResNet)
    head_lr_mult: float | None = None  # task-head lr = lr * this; None: 1000 (ViT) / 10000 (ResNet)
    seed: int = 42  # sampling, augmentation and head initialisation

    # execution
    device: Device = "auto"  # auto picks cuda when available
    workers: int = 4  # DataLoader worker processes (0: load in the main process); scan threads
    amp: bool = False  # bf16 autocast, CUDA only
    workdir: Path = Path("runs/uda")  # checkpoints, logs, residual.safetensors, report.json
    resume: bool = False  # continue from workdir/checkpoint.pt
    checkpoint_every: int = 500  # steps between checkpoints (and one at every epoch end)
    stop_after: int | None = None  # stop after this global step with a checkpoint (resume later)
    eval_batch_size: int = 64  # images per batch in the final evaluation
    publish: str | None = None  # store URL (directory, file://, redis://) to publish to
    task: str | None = None  # task name; None: "<source>2<target>" from the domain folder names
    dry_run: bool = False  # validate everything, train nothing

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def ramp_steps(self) -> int:
        """T_max of the ramp: this run's length unless set (the paper's code fixed 10,000)."""
        return self.ramp_max_steps or self.total_steps

    def validate(self) -> None:
        """Raise ConfigError listing every problem (bad value and allowed range) at once."""
        problems = _data_problems(self) + _number_problems(self) + _choice_problems(self)
        if problems:
            raise ConfigError(problems)

    def resolve_defaults(self, family: str) -> TrainConfig:
        """A copy with lr, head_lr_mult and (with RST) tau filled from the family's defaults."""
        defaults = dict(FAMILY_DEFAULTS[family])
        if not self.rst:
            del defaults["tau"]  # stays None: validate() refuses a tau without --rst
        return dataclasses.replace(self, **{k: v if getattr(self, k) is None else getattr(self, k)
                                            for k, v in defaults.items()})

    def domain_dirs(self) -> tuple[Path, Path]:
        if self.data_root is not None:
            return self.data_root / str(self.source_domain), self.data_root / str(self.target_domain)
        return Path(self.source), Path(self.target)  # type: ignore[arg-type]

    def task_name(self) -> str:
        if self.task:
            return self.task
        src, tgt = self.domain_dirs()
        return f"{src.name}2{tgt.name}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values (paths as strings) for metadata, reports and checkpoints.

        A password in --publish is masked: this dict goes into the published residual, which
        every reader of the store (the servers' read-only user, `uda-store show`) can see."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        if out["publish"] is not None:
            out["publish"] = redact_url(out["publish"])
        return out


def _data_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    folders = cfg.source is not None or cfg.target is not None
    root = cfg.data_root is not None or cfg.source_domain or cfg.target_domain
    if folders and root:
        problems.append("give either --source/--target or --data-root/--source-domain/"
                        "--target-domain, not both")
    elif root:
        for flag, value in (("--data-root", cfg.data_root), ("--source-domain", cfg.source_domain),
                            ("--target-domain", cfg.target_domain)):
            if not value:
                problems.append(f"{flag} is required with --data-root/--source-domain/--target-domain")
    elif not (cfg.source is not None and cfg.target is not None):
        problems.append("--source DIR and --target DIR are required (or --data-root ROOT "
                        "--source-domain Art --target-domain Clipart)")
    try:  # what network.prompts does with it; "{kind}" or "{0} {1}" fail there, not here
        cfg.prompt.format("x")
    except (KeyError, IndexError, ValueError) as e:
        problems.append(f"--prompt {cfg.prompt!r} is not a template with one '{{}}' for the class "
                        f"name ({type(e).__name__}: {e}); write literal braces as {{{{ }}}}, e.g. "
                        "'a photo of a {}.'")
    else:
        if cfg.prompt.format("a") == cfg.prompt.format("b"):  # no "{}", or only an escaped "{{}}"
            problems.append(f"--prompt {cfg.prompt!r} must contain '{{}}' where the class name goes")
    if cfg.classes_file is not None and not Path(cfg.classes_file).is_file():
        problems.append(f"--classes {str(cfg.classes_file)!r} is not a readable file")
    if cfg.publish is not None:
        problems += _store_problems(cfg.publish)
    if not problems:
        try:  # the default name comes from the folder names, which may not be a legal name
            validate_task_name(cfg.task_name())
        except InvalidTaskName as e:
            problems.append(f"--task: {e}" if cfg.task else f"{e} (derived from the domain "
                            "folder names: pass --task NAME)")
    return problems


def _store_problems(url: str) -> list[str]:
    """A --publish URL that open_store cannot parse is found now, not after the training."""
    try:
        open_store(url).close()  # parses the URL; contacts nothing
    except (ValueError, ResidualStoreError) as e:
        return [f"--publish: {one_line(e)}"]
    return []


def _number_problems(cfg: TrainConfig) -> list[str]:
    problems = []

    def need(flag: str, value: Any, ok: bool, allowed: str) -> None:
        if value is not None and not ok:
            problems.append(f"{flag} {value!r} is out of range: expected {allowed}")

    def positive_int(flag: str, value: Any) -> None:
        need(flag, value, isinstance(value, int) and value > 0, "an integer >= 1")

    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    positive_int("--epochs", cfg.epochs)
    positive_int("--iters-per-epoch", cfg.iters_per_epoch)
    positive_int("--batch-size", cfg.batch_size)
    positive_int("--eval-batch-size", cfg.eval_batch_size)
    positive_int("--checkpoint-every", cfg.checkpoint_every)
    positive_int("--stop-after", cfg.stop_after)
    positive_int("--ramp-max-steps", cfg.ramp_max_steps)
    need("--workers", cfg.workers, isinstance(cfg.workers, int) and cfg.workers >= 0, "an integer >= 0")
    need("--seed", cfg.seed, isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**31, "an integer in [0, 2^31)")
    need("--lr", cfg.lr, finite(cfg.lr) and cfg.lr > 0, "a number > 0 (ViT 3e-6, ResNet 3e-7)")
    need("--head-lr-mult", cfg.head_lr_mult, finite(cfg.head_lr_mult) and cfg.head_lr_mult > 0,
         "a number > 0 (ViT 1000, ResNet 10000)")
    need("--tau", cfg.tau, finite(cfg.tau) and cfg.tau >= 0, "a number >= 0 (ViT 1e-6, ResNet 1e-5)")
    need("--fixmatch-threshold", cfg.fixmatch_threshold,
         finite(cfg.fixmatch_threshold) and 0 <= cfg.fixmatch_threshold <= 1, "a number in [0, 1]")
    need("--label-smoothing", cfg.label_smoothing,
         finite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1, "a number in [0, 1)")
    for flag, value in (("--lambda1", cfg.lambda1), ("--lambda2", cfg.lambda2),
                        ("--lambda3", cfg.lambda3)):
        need(flag, value, finite(value) and value >= 0, "a number >= 0")
    need("--gamma", cfg.gamma, finite(cfg.gamma) and cfg.gamma > 0, "a number > 0")
    return problems


def _choice_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    if cfg.method not in METHODS:
        problems.append(f"--method {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.device not in DEVICES:
        problems.append(f"--device {cfg.device!r} is not one of {', '.join(DEVICES)}")
    if cfg.device == "cpu" and cfg.amp:
        problems.append("--amp (bf16 autocast) needs --device cuda or auto with a GPU")
    if cfg.fixmatch and cfg.method != "cmkd":
        problems.append(f"--fixmatch adds to the cmkd losses; it does not apply to --method {cfg.method}")
    if cfg.rst and cfg.method == "zeroshot":
        problems.append("--rst does nothing with --method zeroshot (nothing is trained)")
    if cfg.tau is not None and not cfg.rst:
        problems.append(f"--tau {cfg.tau!r} is the RST threshold: add --rst, or leave --tau out")
    if cfg.method == "baseline" and cfg.batch_size == 1:
        # cmkd puts source and target through the encoder together, so it has 2 images at least
        problems.append("--batch-size 1 with --method baseline: the task head's BatchNorm needs "
                        "at least 2 images per step; use --batch-size 2 or more")
    if cfg.resume and cfg.method == "zeroshot":
        problems.append("--resume does not apply to --method zeroshot (nothing is trained)")
    if cfg.stop_after is not None and cfg.stop_after > cfg.total_steps > 0:
        problems.append(f"--stop-after {cfg.stop_after} is beyond the run's "
                        f"{cfg.total_steps} steps (epochs x iters-per-epoch)")
    return problems
