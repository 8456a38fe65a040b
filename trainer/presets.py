"""The paper's recipe per benchmark (`uda-train --preset NAME`), as its authors ran it.

Every value comes from the authors' released code (configs/<benchmark>.yaml, main.py,
utils/data_loader.py, models/backbone.py) or, where it has none, from the paper (METHOD.md).
Where this project departs from that code the reason is in docs/METHOD.md ("Presets").

A preset fills settings the user did not give; an explicit flag always wins. Learning rates
depend on the backbone family, known only once the model is built, so they are kept per family
and applied by `TrainConfig.resolve_defaults`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# The authors' code fixes the ramp's T_max to 10,000 steps whatever the run's length
# (main.py: max_iter = 10000). With a preset and a run length the user changed, T_max keeps
# the same share of the run (trainer.config.resolve_settings).
AUTHORS_RAMP_STEPS = 10_000

# Prompt templates of models/backbone.py. The authors write the lower-cased class name with
# spaces for underscores; CLIP's tokenizer lower-cases anyway, and network.prompts does the rest.
PHOTO_PROMPT = "a photo of a {}"
OFFICE_HOME_PROMPT = "an image of a {}"
DIGITS_PROMPT = 'a photo of the number: "{}"'

_VIT_LR = {"lr": 3e-6, "head_lr_mult": 1000.0}
_RESNET_LR = {"lr": 3e-7, "head_lr_mult": 10000.0}  # METHOD.md; the authors ship ViT configs only


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark's recipe."""

    name: str
    description: str
    values: dict[str, Any]  # TrainConfig fields the preset sets, whatever the backbone
    family_values: dict[str, dict[str, Any]]  # per backbone family ("vit", "resnet")
    source: str  # where the values come from, shown by --dry-run and report.json

    @property
    def total_steps(self) -> int:
        return int(self.values["epochs"]) * int(self.values["iters_per_epoch"])


def _common(**overrides: Any) -> dict[str, Any]:
    """What every benchmark's config shares (configs/*.yaml, main.py defaults)."""
    values: dict[str, Any] = {
        "epochs": 20, "iters_per_epoch": 500, "batch_size": 32,
        "lambda1": 0.25, "lambda2": 0.1, "lambda3": 0.025, "label_smoothing": 0.1,
        "ramp_max_steps": AUTHORS_RAMP_STEPS, "seed": 42,
        "fixmatch_weight": 0.5, "fixmatch_threshold": 0.95,
        "prompt": PHOTO_PROMPT, "hflip": True, "crop": "random", "crop_scale": None,
    }
    values.update(overrides)
    return values


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("office-home", "Office-Home (65 classes; Art, Clipart, Product, Real_World)",
           _common(prompt=OFFICE_HOME_PROMPT),
           {"vit": _VIT_LR, "resnet": _RESNET_LR}, "configs/office_home.yaml"),
    Preset("office31", "Office-31 (31 classes; amazon, dslr, webcam)",
           _common(), {"vit": _VIT_LR, "resnet": _RESNET_LR}, "configs/office31.yaml"),
    Preset("image-clef", "ImageCLEF-DA (12 classes; c, i, p)",
           _common(), {"vit": _VIT_LR, "resnet": _RESNET_LR}, "configs/image_clef.yaml"),
    Preset("domainnet", "DomainNet (345 classes; 40 epochs x 1000 steps, smaller CMKD weights)",
           _common(epochs=40, iters_per_epoch=1000, lambda1=0.025, lambda3=0.0025),
           {"vit": _VIT_LR, "resnet": _RESNET_LR}, "configs/domain_net.yaml"),
    # VisDA: resize to the input size, no crop (the authors' CenterCrop of a resized square is
    # the identity), flips kept; the encoder lr is ten times smaller than elsewhere.
    Preset("visda", "VisDA-2017 (12 classes; synthetic -> real; mean per-class accuracy)",
           _common(iters_per_epoch=1000, crop="none"),
           {"vit": {"lr": 3e-7, "head_lr_mult": 1000.0}, "resnet": _RESNET_LR},
           "configs/visda.yaml"),
    # Digits: 64 + 64 images per step, RandomResizedCrop(scale 0.75-1.2) and never a flip
    # (a flipped 2 or 5 is another shape), the digits prompt.
    Preset("digits", "Digits (MNIST, USPS, SVHN; 10 classes)",
           _common(iters_per_epoch=1000, batch_size=64, prompt=DIGITS_PROMPT, hflip=False,
                   crop="random-resized", crop_scale=(0.75, 1.2)),
           {"vit": _VIT_LR, "resnet": _RESNET_LR}, "configs/digits.yaml"),
)}

PRESET_NAMES = tuple(PRESETS)


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESET_NAMES)}") from None
