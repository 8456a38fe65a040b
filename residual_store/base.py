"""Which base model a residual belongs to: the open_clip model spec, building it, its fingerprint.

A `BaseSpec` names the frozen CLIP every residual is relative to: an open_clip model name (or a
path to an open_clip model-config JSON), a pretrained tag (or a local checkpoint file) and the
activation of its transformers. OpenAI's CLIP weights were trained with QuickGELU, open_clip 3.x
builds ViT-B-16/RN50 with nn.GELU: `activation()` resolves it (QuickGELU for OpenAI's weights
unless forced), `build` builds with it. The fingerprint, a sha256 over the image encoder's module
structure (activation included) and parameters, is what a residual is checked against.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import struct
import zipfile
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
Activation = Literal["quick_gelu", "gelu"]
QUICK_GELU: Activation = "quick_gelu"
GELU: Activation = "gelu"
ACTIVATIONS: tuple[str, ...] = (QUICK_GELU, GELU)
ACTIVATION_NAMES = {QUICK_GELU: "QuickGELU", GELU: "GELU"}  # as people write them
# Keys OpenAI's own checkpoints carry beside the weights (open_clip's strict load refuses them).
OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
# A folder named for OpenAI's weights: "openai", HF's "vit_base_patch16_clip_224.openai" (and its
# cache's "models--timm--vit_base_patch16_clip_224.openai"); a file name with an "openai" word
# ("openai-ViT-B-16.bin") counts too.
_OPENAI_DIR = re.compile(r"(^|[._-])openai$", re.IGNORECASE)
_MAX_INSPECTED_BYTES = 64 << 20  # a ViT-L state dict's pickled key list is a few hundred KB

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
    # QuickGELU in the transformers: None = auto (on for OpenAI's weights, see activation()),
    # True/False forces it either way
    quick_gelu: bool | None = None

    @property
    def pretrained_label(self) -> str:
        """What goes into a residual's `base_pretrained` metadata."""
        return self.pretrained or RANDOM_INIT

    def activation(self) -> Activation:
        """"quick_gelu" or "gelu": what `build` gives the transformers (`base_activation` metadata)."""
        return self._resolve_activation()[0]

    def describe(self) -> str:
        """'ViT-B-16/openai, QuickGELU': model, weights and activation, for logs and banners."""
        return f"{self.model}/{self.pretrained_label}, {ACTIVATION_NAMES[self.activation()]}"

    def _resolve_activation(self) -> tuple[Activation, str]:
        """The activation and why. Auto: QuickGELU when the model config asks for it (a
        `-quickgelu` name), the pretrained tag was trained with it (`openai` and others open_clip
        marks), or the local checkpoint is OpenAI's; GELU otherwise."""
        if self.quick_gelu is not None:
            return (QUICK_GELU if self.quick_gelu else GELU), "forced"
        name = self.model_name()
        if name.endswith("-quickgelu") or _model_config(name).get("quick_gelu"):
            return QUICK_GELU, f"model config {name} asks for it"
        pretrained = self.pretrained
        if pretrained in (None, "", RANDOM_INIT):
            return GELU, "random weights"
        if _is_checkpoint_path(pretrained):
            why = openai_checkpoint_reason(pretrained)
            return (QUICK_GELU, why) if why else (GELU, "checkpoint is not OpenAI's")
        if pretrained == "openai" or _tag_config(name, pretrained).get("quick_gelu"):
            return QUICK_GELU, f"pretrained tag {pretrained!r} was trained with it"
        return GELU, f"pretrained tag {pretrained!r}"

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
        if _is_checkpoint_path(pretrained) and not Path(pretrained).is_file():
            raise BaseModelError(f"checkpoint {pretrained!r} not found: pass an existing "
                                 ".pt/.bin/.safetensors file or a pretrained tag")
        activation, why = self._resolve_activation()
        # force_quick_gelu can only turn it on; the constructor keyword also turns a -quickgelu
        # config's off when forced.
        act = {"force_quick_gelu": True} if activation == QUICK_GELU else {"quick_gelu": False}
        random_init = pretrained in (None, "", RANDOM_INIT)
        logger.info("building %s with %s weights and %s (%s)", name,
                    f"seeded random (seed {RANDOM_SEED})" if random_init else repr(pretrained),
                    ACTIVATION_NAMES[activation], why)
        if random_init:
            with _seeded(RANDOM_SEED):
                model = open_clip.create_model(name, pretrained=None, device="cpu", **act)
        elif _is_checkpoint_path(pretrained):
            model = _build_from_checkpoint(name, pretrained, act)
        else:
            model = _build_from_tag(name, pretrained, act)
        return model.to(device).eval()

    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.model_name())


def _build_from_checkpoint(name: str, path: str, act: dict) -> nn.Module:
    import open_clip
    from open_clip.factory import load_state_dict

    if _is_torchscript(path):
        raise BaseModelError(
            f"checkpoint {path!r} is a TorchScript archive (OpenAI's original .pt), which cannot "
            "be read without running its pickled code: pass the 'openai' tag or a state-dict "
            "checkpoint (e.g. open_clip_pytorch_model.bin of timm/vit_base_patch16_clip_224.openai)")
    try:
        if not _has_openai_keys(path):
            return open_clip.create_model(name, pretrained=path, device="cpu", weights_only=True, **act)
        # OpenAI's state dicts carry input_resolution/context_length/vocab_size beside the
        # weights, which open_clip's strict loading refuses: drop them, then load strictly.
        with _seeded(RANDOM_SEED):  # the init is overwritten; the caller's RNG stays untouched
            model = open_clip.create_model(name, pretrained=None, device="cpu", **act)
        state = load_state_dict(path, device="cpu", weights_only=True)
        model.load_state_dict({k: v for k, v in state.items() if k not in OPENAI_KEYS}, strict=True)
        return model
    except Exception as e:  # open_clip raises RuntimeError/KeyError/pickle errors alike
        raise BaseModelError(f"checkpoint {path!r} does not fit model {name}: "
                             f"{one_line(e, limit=300)}") from e


def _build_from_tag(name: str, tag: str, act: dict) -> nn.Module:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise BaseModelError(f"unknown pretrained tag {tag!r} for {name}: known tags {tags}, "
                             "or pass a local checkpoint file (.pt/.bin/.safetensors)")
    try:
        return open_clip.create_model(name, pretrained=tag, device="cpu", **act)
    except Exception as e:  # download failures surface as RuntimeError, OSError, HF errors...
        raise BaseModelError(
            f"could not load pretrained weights {name}/{tag} (no network?): {one_line(e, limit=300)}. Download the "
            f"checkpoint elsewhere and pass it as a local file: --pretrained /path/to/open_clip_model.safetensors"
        ) from e


def _is_checkpoint_path(pretrained: str | None) -> bool:
    return bool(pretrained) and (pretrained.endswith(CHECKPOINT_SUFFIXES) or Path(pretrained).exists())


def _model_config(name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(name) or {}


def _tag_config(name: str, tag: str) -> dict:
    import open_clip

    return open_clip.get_pretrained_cfg(name, tag) or {}


def openai_checkpoint_reason(path: str | os.PathLike) -> str | None:
    """Why the local checkpoint at `path` is OpenAI's (so was trained with QuickGELU), or None.

    OpenAI's: a path naming openai (a folder such as HF's vit_base_patch16_clip_224.openai, or
    a file name with the word openai), a TorchScript archive (how OpenAI ships ViT-B-16.pt), or a state dict with OpenAI's extra keys
    (input_resolution, context_length, vocab_size). Nothing is unpickled: a safetensors header is
    read as JSON, a torch zip archive's entry names and its pickle's bytes are only searched.
    """
    path = Path(path)
    named = [part for part in path.parent.parts if _OPENAI_DIR.search(part)]
    named += [path.name] if "openai" in re.split(r"[._-]", path.stem.lower()) else []
    if named:
        return f"checkpoint path names openai ({named[-1]})"
    try:
        stat = path.stat()
    except OSError:
        return None
    return _inspect_checkpoint(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _inspect_checkpoint(path: str, mtime_ns: int, size: int) -> str | None:
    """openai_checkpoint_reason's file inspection, cached per file version (builds ask twice)."""
    if _is_torchscript(path):
        return "checkpoint is a TorchScript archive, as OpenAI ships its weights"
    if _has_openai_keys(path):
        return f"checkpoint carries OpenAI's keys {', '.join(OPENAI_KEYS)}"
    return None


def _has_openai_keys(path: str) -> bool:
    return all(_names_key(path, k) for k in OPENAI_KEYS)


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with constants.pkl (what torch.jit.save writes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _names_key(path: str, key: str) -> bool:
    """Whether the checkpoint names `key`: a top-level (or module.) safetensors tensor, or a
    string in a torch.save archive's pickle."""
    if path.endswith(".safetensors"):
        names = _safetensors_names(path)
        return any(n.rsplit(".", 1)[-1] == key and n.count(".") <= 1 for n in names)
    pickled = _zip_pickle_bytes(path)
    # The key as a pickled string: SHORT_BINUNICODE (0x8c, 1-byte length) or BINUNICODE ('X',
    # 4-byte length); the length prefix makes it the whole string, not part of a longer one.
    raw = key.encode()
    return (b"\x8c" + bytes([len(raw)]) + raw in pickled
            or b"X" + struct.pack("<I", len(raw)) + raw in pickled)


def _safetensors_names(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_INSPECTED_BYTES:
                return []
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def _zip_pickle_bytes(path: str) -> bytes:
    """The bytes of a torch.save zip archive's data.pkl (b"" for other files), never unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            entry = next((i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"), None)
            if entry is None or entry.file_size > _MAX_INSPECTED_BYTES:
                return b""
            return z.read(entry)
    except (OSError, zipfile.BadZipFile):
        return b""


def model_activation(model: nn.Module) -> Activation:
    """The activation a built CLIP model's transformers use: "quick_gelu" when any submodule is
    open_clip's QuickGELU (the text tower always has some), else "gelu"."""
    from open_clip.transformer import QuickGELU

    return QUICK_GELU if any(isinstance(m, QuickGELU) for m in model.modules()) else GELU


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
    """sha256 over the encoder's structure and weights: every submodule's name, class and
    extra_repr in order (so QuickGELU and GELU differ, as do other config changes that keep the
    weights), then the parameters' names, dtypes, shapes and bytes in registration order."""
    h = hashlib.sha256()
    for name, module in encoder.named_modules():
        h.update(f"module {name}|{type(module).__name__}|{module.extra_repr()}\n".encode())
    for name, p in encoder.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
