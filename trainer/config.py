"""The training configuration: every `uda-train` flag as one dataclass, validated at once.

Backbone-dependent defaults (METHOD.md, "Optimisation") are left as None here and filled by
`resolve_defaults` once the model's family is known:

    family   lr     head-lr multiplier m   tau
    vit      3e-6   1000                   1e-6
    resnet   3e-7   10000                  1e-5
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Literal

from residual_store.errors import InvalidTaskName, ResidualStoreError, one_line
from residual_store.settings import range_problems, setting
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


def _no_weights_is_none(text: str | None) -> str | None:
    return None if text in ("", "none", "None") else text


def _switch(help: str, group: str = "execution") -> Any:
    return setting(False, help, action="store_true", group=group)


def _number(default: float | None, help: str, group: str = "method", **bounds: Any) -> Any:
    return setting(default, help, type=float, finite=True, group=group, **bounds)


def _count(default: int | None, help: str, group: str = "execution", **how: Any) -> Any:
    """A number of steps, epochs or images: an integer >= 1."""
    return setting(default, help, type=int, integer=True, ge=1, group=group, **how)

# The argument groups of uda-train's --help, in order.
GROUPS = {
    "data": "data (ImageFolder layout DOMAIN/<class>/<image>, or Office-31's "
            "DOMAIN/images/<class>/<image>)",
    "recipe": "recipe", "model": "model", "method": "method (METHOD.md)",
    "augmentation": "augmentation of the training views", "optimisation": "optimisation",
    "execution": "execution",
}


@dataclasses.dataclass
class TrainConfig:
    """One `uda-train` run. Paths are as given; `validate()` checks them exist."""

    # data: either source/target folders, or data_root with two domain names
    source: Path | None = setting(None, "labelled source domain folder", type=Path, group="data")
    target: Path | None = setting(None, "unlabelled target domain folder (labels only evaluate)",
                                  type=Path, group="data")
    target_eval: Path | None = setting(None, "labelled held-out target split to evaluate instead of "
                                       "--target", type=Path, metavar="DIR", group="data")
    data_root: Path | None = setting(None, "dataset root with one folder per domain", type=Path,
                                     group="data")
    source_domain: str | None = setting(None, "source domain folder under --data-root (e.g. Art)",
                                        group="data")
    target_domain: str | None = setting(None, "target domain folder under --data-root (e.g. "
                                        "Clipart)", group="data")
    classes_file: Path | None = setting(None, "display names, one per line, in sorted class-folder "
                                        "order", flag="--classes", type=Path, metavar="FILE",
                                        group="data")
    # "{}" is replaced by the class name; _data_problems checks the template
    prompt: str = setting("a photo of a {}.", "CLIP prompt template (default: %(default)r)",
                          group="data")
    preset: str | None = setting(None, "the paper's recipe for a benchmark; explicit flags override "
                                 "it: " + "; ".join(f"{n}: {presets.PRESETS[n].description}"
                                                    for n in presets.PRESET_NAMES),
                                 choices=presets.PRESET_NAMES, group="recipe")

    # model
    model: str = setting("ViT-B-16", "open_clip model name or model-config JSON (default: "
                         "%(default)s; tiny test configs: uda-tiny-vit, uda-tiny-rn)", group="model")
    # None (also "", "none" on the command line) or "random": seeded random weights
    pretrained: str | None = setting("openai", "pretrained tag, local checkpoint file, or 'random' "
                                     "for seeded random weights (default: %(default)s)",
                                     convert=_no_weights_is_none, group="model")
    quick_gelu: bool | None = setting(None, "build with QuickGELU, as OpenAI trained its CLIPs "
                                      "(default: when the weights are OpenAI's)",
                                      action=argparse.BooleanOptionalAction, group="model")

    # method
    method: Method = setting("cmkd", "cmkd, baseline (source only) or zeroshot (trains nothing)",
                             choices=METHODS, group="method")
    rst: bool = _switch("Residual Sparse Training: reset |w - w0| <= tau to w0 after each step",
                        "method")
    tau: float | None = _number(None, "RST threshold (default: ViT 1e-6, ResNet 1e-5)", ge=0,
                                unit="(ViT 1e-6, ResNet 1e-5)")
    fixmatch: bool = _switch("add the FixMatch term (cmkd only)", "method")
    fixmatch_threshold: float = _number(0.95, "confidence needed to keep a pseudo-label", ge=0, le=1)
    fixmatch_weight: float = _number(0.5, "weight of each FixMatch term (task head, CLIP head; "
                                     "default: %(default)s)", ge=0)
    alpha: Alpha = setting("kl", "CMKD trade-off: exp(-KL(p_g||p_h)) (the paper), "
                           "exp(-entropy(p_h)), or fixed --alpha-value", choices=ALPHAS, group="method")
    alpha_value: float = _number(0.5, "the trade-off of --alpha fixed (default: %(default)s)",
                                 ge=0, le=1)
    task_weight: float = _number(1.0, "multiplies L_task; 0 switches it off (default: %(default)s)",
                                 ge=0)
    distill_weight: float = _number(1.0, "multiplies L_distill; 0 switches it off (default: "
                                    "%(default)s)", ge=0)
    label_smoothing: float = _number(0.1, "label smoothing of L_cls", ge=0, lt=1)
    lambda1: float = _number(0.25, "weight of L_task and L_distill", ge=0)
    lambda2: float = _number(0.1, "weight of the CLIP head's source CE in L_reg", ge=0)
    lambda3: float = _number(0.025, "weight of the CLIP head's Gini impurity in L_reg", ge=0)
    gamma: float = _number(1.0, "ramp steepness", gt=0)
    # the paper's code fixed 10,000
    ramp_max_steps: int | None = _count(None, "ramp T_max (default: epochs x iters-per-epoch)",
                                        "method")

    # augmentation (training views; evaluation always resizes to the input size, as the server)
    hflip: bool = setting(True, "random horizontal flips (--no-hflip for digits, text, anything a "
                          "mirror turns into another class)", action=argparse.BooleanOptionalAction,
                          group="augmentation")
    crop: Crop = setting("random", "random: resize to S*256/224 and crop S (default); "
                         "random-resized: RandomResizedCrop to S; none: resize to S",
                         choices=CROPS, group="augmentation")
    # checked by _number_problems (two numbers, MIN <= MAX) and _choice_problems (needs the crop)
    crop_scale: tuple[float, float] | None = setting(
        None, "area range of --crop random-resized (default: 0.08 1.0)", type=float, nargs=2,
        metavar=("MIN", "MAX"), convert=tuple, group="augmentation")

    # optimisation
    epochs: int = _count(20, "epochs (METHOD.md: 20)", "optimisation")
    iters_per_epoch: int = _count(500, "steps per epoch (METHOD.md: 500; digits: 1000)",
                                  "optimisation")
    batch_size: int = _count(32, "images per domain per step (and per process under torchrun)",
                             "optimisation")
    lr: float | None = _number(None, "encoder lr (default: ViT 3e-6, ResNet 3e-7)", gt=0,
                               unit="(ViT 3e-6, ResNet 3e-7)", group="optimisation")
    head_lr_mult: float | None = _number(None, "head lr = lr x this (default: ViT 1000, ResNet "
                                         "10000)", gt=0, unit="(ViT 1000, ResNet 10000)",
                                         group="optimisation")
    seed: int = setting(42, "sampling, augmentation and head initialisation", type=int,
                        integer=True, ge=0, lt=2**31, group="optimisation")

    # execution
    device: Device = setting("auto", "auto picks cuda when available", choices=DEVICES,
                             group="execution")
    workers: int = setting(help="data loader processes (and threads decoding every image once up "
                           "front; default: %(default)s, at most the CPU count)",
                           default_factory=default_workers, type=int, integer=True, ge=0,
                           group="execution")
    amp: bool = _switch("bf16 autocast (CUDA only)")
    workdir: Path = setting(Path("runs/uda"), "checkpoints, logs, residual.safetensors, "
                            "report.json (default: %(default)s)", type=Path, group="execution")
    resume: bool = _switch("continue from WORKDIR/checkpoint.pt")
    overwrite: bool = _switch("start afresh in a workdir that holds a run, removing that run's "
                              "checkpoint, log, report, residual and plots")
    allow_data_change: bool = _switch("--resume although images were added, removed or changed "
                                      "since the checkpoint (on purpose)")
    checkpoint_every: int = _count(500, "steps between checkpoints (and one at every epoch end)")
    stop_after: int | None = _count(None, "stop after this global step with a checkpoint; "
                                    "continue with --resume", metavar="STEPS")
    eval_batch_size: int = _count(64, "images per batch in the evaluations")
    eval_every: int | None = _count(None, "evaluate the target every STEPS steps during training "
                                    "(curves in training.png, the best step in report.json)",
                                    metavar="STEPS")
    log_every: int = _count(50, "steps between progress lines when stderr is not a terminal "
                            "(also at least every 30 s; default: %(default)s)", metavar="STEPS")
    publish: str | None = setting(None, "store to publish to: a directory, file:///path or "
                                  "redis://host:6379/0", metavar="STORE_URL", group="execution")
    task: str | None = setting(None, "task name (default: <source>2<target> folder names)",
                               group="execution")
    allow_class_change: bool = _switch("let --publish replace a task whose class list or base "
                                       "(model, weights) differs from this run's")
    dry_run: bool = _switch("validate everything, train nothing")
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
    """The declared bounds and choices of every setting, and --crop-scale's pair."""
    problems = range_problems(cfg)
    if cfg.crop_scale is not None:
        lo_hi = tuple(cfg.crop_scale)
        if not (len(lo_hi) == 2 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in lo_hi)
                and 0 < lo_hi[0] <= lo_hi[1]):
            problems.append(f"--crop-scale {list(lo_hi)!r} is out of range: expected two numbers "
                            "MIN MAX with 0 < MIN <= MAX, e.g. 0.75 1.2")
    return problems


def _choice_problems(cfg: TrainConfig) -> list[str]:
    """Rules between settings (each setting's own choices are in _number_problems)."""
    problems = []
    if cfg.crop in CROPS and cfg.provenance.get("crop_scale") == "flag" and cfg.crop != "random-resized":
        problems.append(f"--crop-scale sets the area range of --crop random-resized; this run "
                        f"crops {cfg.crop!r}: add --crop random-resized or leave --crop-scale out")
    if cfg.alpha in ALPHAS and cfg.provenance.get("alpha_value") == "flag" and cfg.alpha != "fixed":
        problems.append(f"--alpha-value is the trade-off of --alpha fixed; this run uses "
                        f"--alpha {cfg.alpha}: add --alpha fixed or leave --alpha-value out")
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
