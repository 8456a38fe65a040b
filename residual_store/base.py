"""Which base model a residual belongs to: the open_clip model spec, building it, its fingerprint.

A `BaseSpec` names the frozen CLIP every residual is relative to: an open_clip model name (or a
path to an open_clip model-config JSON) plus a pretrained tag (or a local checkpoint file). The
fingerprint, a sha256 over the image encoder's parameters, is what a residual is checked against.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from residual_store.errors import BaseModelError, one_line

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Seeded random initialisation: tests, the demo and timing benchmarks use it on purpose.
RANDOM_INIT = "random"
RANDOM_SEED = 0

_registered = False


def register_model_configs() -> None:
    """Make the shipped tiny configs (uda-tiny-vit, uda-tiny-rn) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    """The frozen CLIP that every residual of a deployment is relative to."""

    model: str  # open_clip model name ("ViT-B-16") or path to a model-config JSON
    pretrained: str | None = None  # tag ("openai"), local checkpoint path, or None/"random"

    @property
    def pretrained_label(self) -> str:
        """What goes into a residual's `base_pretrained` metadata."""
        return self.pretrained or RANDOM_INIT

    def model_name(self) -> str:
        """The open_clip registry name, registering a config JSON path first if given one."""
        register_model_configs()
        import open_clip

        if self.model.endswith(".json"):
            path = Path(self.model)
            if not path.is_file():
                raise BaseModelError(f"model config {self.model!r} not found: pass an open_clip "
                                     "model name (e.g. ViT-B-16) or an existing model-config JSON path")
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise BaseModelError(f"model config {self.model!r} is not readable JSON: {e}") from e
            if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise BaseModelError(f"model config {self.model!r} lacks embed_dim/vision_cfg/text_cfg")
            open_clip.add_model_config(path)
            return path.stem
        if self.model not in open_clip.list_models():
            raise BaseModelError(f"unknown open_clip model {self.model!r}: use a name from "
                                 "open_clip.list_models() (e.g. ViT-B-16, RN50, uda-tiny-vit) "
                                 "or a path to a model-config JSON")
        return self.model

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """Build the CLIP model in eval mode with its weights; nothing is downloaded for a path."""
        import open_clip

        name = self.model_name()
        pretrained = self.pretrained
        if pretrained in (None, "", RANDOM_INIT):
            logger.info("building %s with seeded random weights (seed %d)", name, RANDOM_SEED)
            with _seeded(RANDOM_SEED):
                model = open_clip.create_model(name, pretrained=None, device="cpu")
        elif pretrained.endswith(CHECKPOINT_SUFFIXES) or Path(pretrained).exists():
            if not Path(pretrained).is_file():
                raise BaseModelError(f"checkpoint {pretrained!r} not found: pass an existing "
                                     ".pt/.bin/.safetensors file or a pretrained tag")
            try:
                model = open_clip.create_model(name, pretrained=pretrained, device="cpu",
                                               weights_only=True)
            except Exception as e:  # open_clip raises RuntimeError/KeyError/pickle errors alike
                raise BaseModelError(f"checkpoint {pretrained!r} does not fit model {name}: "
                                     f"{one_line(e, limit=300)}") from e
        else:
            model = _build_from_tag(name, pretrained)
        return model.to(device).eval()

    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.model_name())


def _build_from_tag(name: str, tag: str) -> nn.Module:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise BaseModelError(f"unknown pretrained tag {tag!r} for {name}: known tags {tags}, "
                             "or pass a local checkpoint file (.pt/.bin/.safetensors)")
    try:
        return open_clip.create_model(name, pretrained=tag, device="cpu")
    except Exception as e:  # download failures surface as RuntimeError, OSError, HF errors...
        raise BaseModelError(
            f"could not load pretrained weights {name}/{tag} (no network?): {one_line(e, limit=300)}. Download the "
            f"checkpoint elsewhere and pass it as a local file: --pretrained /path/to/open_clip_model.safetensors"
        ) from e


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def image_encoder(model: nn.Module) -> nn.Module:
    """The part of a CLIP model that residuals change."""
    return model.visual


def backbone_family(model: nn.Module) -> Literal["vit", "resnet"]:
    """ViT and ResNet encoders have different training defaults (METHOD.md)."""
    from open_clip.modified_resnet import ModifiedResNet

    return "resnet" if isinstance(image_encoder(model), ModifiedResNet) else "vit"


def input_size(model: nn.Module) -> int:
    """Square input side S of the image encoder."""
    size = image_encoder(model).image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def embed_dim(model: nn.Module) -> int:
    """Width of the image features the task head reads."""
    return int(image_encoder(model).output_dim)


def fingerprint(encoder: nn.Module) -> str:
    """sha256 over the encoder's parameter names, dtypes, shapes and bytes, in registration order."""
    h = hashlib.sha256()
    for name, p in encoder.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
