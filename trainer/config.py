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
import os
from pathlib import Path
from typing import Any, Literal

from residual_store.errors import InvalidTaskName, ResidualStoreError, one_line
from residual_store.stores import open_store, redact_url, validate_task_name
from trainer import checkpoint, presets
from trainer.errors import ConfigError

Method = Literal["cmkd", "baseline", "zeroshot"]
Device = Literal["auto", "cpu", "cuda"]
Crop = Literal["random", "random-resized", "none"]
Alpha = Literal["kl", "entropy", "fixed"]
METHODS = ("cmkd", "baseline", "zeroshot")
DEVICES = ("auto", "cpu", "cuda")
CROPS = ("random", "random-resized", "none")
ALPHAS = ("kl", "entropy", "fixed")
DEFAULT_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default

FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    "vit": {"lr": 3e-6, "head_lr_mult": 1000.0, "tau": 1e-6},
    "resnet": {"lr": 3e-7, "head_lr_mult": 10000.0, "tau": 1e-5},
}

# Fields whose value changes the trained weights: a checkpoint only resumes under the same ones.
TRAINING_FIELDS = ("model", "pretrained", "quick_gelu", "method", "rst", "tau", "fixmatch", "epochs",
                   "iters_per_epoch", "batch_size", "lr", "head_lr_mult", "seed", "prompt",
                   "label_smoothing", "lambda1", "lambda2", "lambda3", "gamma", "ramp_max_steps",
                   "fixmatch_threshold", "fixmatch_weight", "amp", "hflip", "crop", "crop_scale",
                   "alpha", "alpha_value", "task_weight", "distill_weight")


def default_workers() -> int:
    """Loader processes: 4 (the authors' setting), never more than the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


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
    target_eval: Path | None = None  # labelled held-out target split evaluated instead of --target
    preset: str | None = None  # the paper's recipe for a benchmark (trainer/presets.py)

    # model
    model: str = "ViT-B-16"  # open_clip model name or model-config JSON path
    pretrained: str | None = "openai"  # pretrained tag, local checkpoint, or None/"random"
    quick_gelu: bool | None = None  # QuickGELU activation; None: when the weights are OpenAI's

    # method
    method: Method = "cmkd"  # cmkd | baseline (source only) | zeroshot (trains nothing)
    rst: bool = False  # Residual Sparse Training: reset |w - w0| <= tau to w0 after each step
    tau: float | None = None  # RST threshold; None: 1e-6 (ViT) / 1e-5 (ResNet)
    fixmatch: bool = False  # add METHOD.md's optional FixMatch term (cmkd only)
    fixmatch_threshold: float = 0.95  # confidence needed to keep a pseudo-label
    fixmatch_weight: float = 0.5  # weight of each FixMatch term (task head, CLIP head)
    alpha: Alpha = "kl"  # CMKD trade-off: exp(-KL(p_g||p_h)) | exp(-H(p_h)) | fixed alpha_value
    alpha_value: float = 0.5  # the trade-off with alpha "fixed"
    task_weight: float = 1.0  # multiplies L_task (0 switches it off; ablation)
    distill_weight: float = 1.0  # multiplies L_distill (0 switches it off; ablation)
    label_smoothing: float = 0.1  # on L_cls
    lambda1: float = 0.25  # weight of L_task and L_distill
    lambda2: float = 0.1  # weight of the CLIP head's source CE in L_reg
    lambda3: float = 0.025  # weight of the CLIP head's Gini impurity in L_reg
    gamma: float = 1.0  # ramp steepness
    ramp_max_steps: int | None = None  # ramp T_max; None: epochs * iters_per_epoch (this run)

    # augmentation (training views; evaluation always resizes to the input size, as the server)
    hflip: bool = True  # random horizontal flip (off for digits and text: a flipped 2 is no 2)
    crop: Crop = "random"  # random: resize to S*256/224 then crop S; random-resized; none: resize to S
    crop_scale: tuple[float, float] | None = None  # area range of random-resized; None: (0.08, 1)

    # optimisation
    epochs: int = 20  # METHOD.md: 20
    iters_per_epoch: int = 500  # METHOD.md: 500 (digits: 1000)
    batch_size: int = 32  # images per domain per step (and per process under torchrun)
    lr: float | None = None  # image-encoder learning rate; None: 3e-6 (ViT) / 3e-7 (ResNet)
    head_lr_mult: float | None = None  # task-head lr = lr * this; None: 1000 (ViT) / 10000 (ResNet)
    seed: int = 42  # sampling, augmentation and head initialisation

    # execution
    device: Device = "auto"  # auto picks cuda when available
    workers: int = dataclasses.field(default_factory=default_workers)  # loader processes; scan threads
    amp: bool = False  # bf16 autocast, CUDA only
    workdir: Path = Path("runs/uda")  # checkpoints, logs, residual.safetensors, report.json
    resume: bool = False  # continue from workdir/checkpoint.pt
    overwrite: bool = False  # start afresh in a workdir holding a run (its files are removed)
    allow_data_change: bool = False  # --resume although the images changed since the checkpoint
    checkpoint_every: int = 500  # steps between checkpoints (and one at every epoch end)
    stop_after: int | None = None  # stop after this global step with a checkpoint (resume later)
    eval_batch_size: int = 64  # images per batch in the evaluations
    eval_every: int | None = None  # evaluate the target every this many steps during training
    log_every: int = 50  # steps between plain progress lines when stderr is not a terminal
    publish: str | None = None  # store URL (directory, file://, redis://) to publish to
    task: str | None = None  # task name; None: "<source>2<target>" from the domain folder names
    allow_class_change: bool = False  # --publish may change an existing task's classes or base
    dry_run: bool = False  # validate everything, train nothing
    # where each setting came from ("default", "preset NAME", "flag", ...); not a setting itself
    provenance: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

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

    @classmethod
    def from_settings(cls, given: dict[str, Any]) -> TrainConfig:
        """A config from the settings a user gave (flags), over a --preset's, over the defaults,
        remembering where each came from. Unknown preset names are left to validate()."""
        values: dict[str, Any] = {}
        provenance = {f.name: "default" for f in dataclasses.fields(cls) if f.name != "provenance"}
        name = given.get("preset")
        preset = presets.PRESETS.get(name) if name else None
        if preset is not None:
            for key, value in preset.values.items():
                values[key], provenance[key] = value, f"preset {name}"
        for key, value in given.items():
            values[key], provenance[key] = value, "flag"
        if (preset is not None and "ramp_max_steps" not in given
                and ({"epochs", "iters_per_epoch"} & given.keys())):
            # the authors' T_max is a share of their run's length: keep the share, not the count
            total = int(values["epochs"]) * int(values["iters_per_epoch"])
            values["ramp_max_steps"] = max(1, round(presets.AUTHORS_RAMP_STEPS * total / preset.total_steps))
            provenance["ramp_max_steps"] = (f"preset {name}, scaled to this run's {total} steps "
                                            f"({presets.AUTHORS_RAMP_STEPS} of {preset.total_steps})")
        return cls(**values, provenance=provenance)

    def resolve_defaults(self, family: str) -> TrainConfig:
        """A copy with lr, head_lr_mult and (with RST) tau filled for the backbone family: from
        the preset when there is one, else FAMILY_DEFAULTS."""
        defaults = dict(FAMILY_DEFAULTS[family])
        origin = {k: f"default ({family})" for k in defaults}
        preset = presets.PRESETS.get(self.preset) if self.preset else None
        if preset is not None:
            for key, value in preset.family_values.get(family, {}).items():
                defaults[key], origin[key] = value, f"preset {self.preset} ({family})"
        if not self.rst:
            del defaults["tau"]  # stays None: validate() refuses a tau without --rst
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        provenance = {**self.provenance, **{k: origin[k] for k in filled}}
        return dataclasses.replace(self, **filled, provenance=provenance)

    def settings(self) -> dict[str, dict[str, Any]]:
        """Every setting with its value and where it came from (--dry-run, report.json)."""
        values = self.to_dict()
        return {k: {"value": values[k], "from": self.provenance.get(k, "default")} for k in values}

    @property
    def resolved_crop_scale(self) -> tuple[float, float]:
        return tuple(self.crop_scale) if self.crop_scale else DEFAULT_CROP_SCALE  # type: ignore[return-value]

    def domain_dirs(self) -> tuple[Path, Path]:
        if self.data_root is not None:
            return self.data_root / str(self.source_domain), self.data_root / str(self.target_domain)
        return Path(self.source), Path(self.target)  # type: ignore[arg-type]

    def task_name(self) -> str:
        """--task, or "<source>2<target>" from the domains' real folder names (see domain_name)."""
        if self.task:
            return self.task
        src, tgt = self.domain_dirs()
        return f"{domain_name(src)}2{domain_name(tgt)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values (paths as strings) for metadata, reports and checkpoints.

        A password in --publish is masked: this dict goes into the published residual, which
        every reader of the store (the servers' read-only user, `uda-store show`) can see."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
               if k != "provenance"}
        if out["crop_scale"] is not None:
            out["crop_scale"] = list(out["crop_scale"])  # as JSON reads it back
        if out["publish"] is not None:
            out["publish"] = redact_url(out["publish"])
        return out


# Folder names that say how a dataset is laid out, not which domain it is.
LAYOUT_FOLDERS = frozenset({"images", "image", "imgs", "img", "data",
                            "train", "training", "val", "valid", "validation", "test", "testing",
                            "all", "unlabeled", "unlabelled", "labeled", "labelled"})


def domain_name(folder: Path) -> str:
    """A domain's name from its folder: the path resolved (`.` and `..` become real names),
    layout folders skipped (`office31/amazon/images` -> `amazon`, `visda/train` -> `visda`)."""
    path = Path(folder).expanduser().absolute().resolve()
    for part in (path, *path.parents):
        if part.name and part.name.lower() not in LAYOUT_FOLDERS:
            return part.name
    return path.name or "root"


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
    if cfg.target_eval is not None and not Path(cfg.target_eval).is_dir():
        problems.append(f"--target-eval {str(cfg.target_eval)!r} is not a folder: expected a "
                        "labelled target split DIR/<class>/<image>")
    problems += checkpoint.workdir_problems(Path(cfg.workdir), cfg.resume, cfg.overwrite)
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
    positive_int("--eval-every", cfg.eval_every)
    positive_int("--log-every", cfg.log_every)
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
    for flag, value in (("--fixmatch-weight", cfg.fixmatch_weight), ("--task-weight", cfg.task_weight),
                        ("--distill-weight", cfg.distill_weight)):
        need(flag, value, finite(value) and value >= 0, "a number >= 0")
    need("--alpha-value", cfg.alpha_value, finite(cfg.alpha_value) and 0 <= cfg.alpha_value <= 1,
         "a number in [0, 1]")
    if cfg.crop_scale is not None:
        lo_hi = tuple(cfg.crop_scale)
        need("--crop-scale", list(lo_hi), len(lo_hi) == 2 and all(map(finite, lo_hi))
             and 0 < lo_hi[0] <= lo_hi[1], "two numbers MIN MAX with 0 < MIN <= MAX, e.g. 0.75 1.2")
    return problems


def _choice_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    if cfg.preset is not None and cfg.preset not in presets.PRESETS:
        problems.append(f"--preset {cfg.preset!r} is not one of {', '.join(presets.PRESET_NAMES)}")
    if cfg.crop not in CROPS:
        problems.append(f"--crop {cfg.crop!r} is not one of {', '.join(CROPS)}")
    elif cfg.provenance.get("crop_scale") == "flag" and cfg.crop != "random-resized":
        problems.append(f"--crop-scale sets the area range of --crop random-resized; this run "
                        f"crops {cfg.crop!r}: add --crop random-resized or leave --crop-scale out")
    if cfg.alpha not in ALPHAS:
        problems.append(f"--alpha {cfg.alpha!r} is not one of {', '.join(ALPHAS)}")
    elif cfg.provenance.get("alpha_value") == "flag" and cfg.alpha != "fixed":
        problems.append(f"--alpha-value is the trade-off of --alpha fixed; this run uses "
                        f"--alpha {cfg.alpha}: add --alpha fixed or leave --alpha-value out")
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
        # cmkd with batches of one puts the domains through together (trainer.loop), so it has
        # 2 images at least; the baseline has only the source
        problems.append("--batch-size 1 with --method baseline: the task head's BatchNorm needs "
                        "at least 2 images per step; use --batch-size 2 or more")
    if cfg.resume and cfg.method == "zeroshot":
        problems.append("--resume does not apply to --method zeroshot (nothing is trained)")
    if cfg.stop_after is not None and cfg.stop_after > cfg.total_steps > 0:
        problems.append(f"--stop-after {cfg.stop_after} is beyond the run's "
                        f"{cfg.total_steps} steps (epochs x iters-per-epoch)")
    return problems
