"""Builders shared by the residual format / swap / base tests: a tiny base with its flat buffer,
random sparse tuned weights, real residuals, and byte-level surgery on safetensors files.

Imported by plain name (`from helpers_residual import ...`): pytest puts this folder on sys.path.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save as st_save

from residual_store import (
    BaseSpec,
    FlatParams,
    Residual,
    TaskHead,
    embed_dim,
    extract,
    fingerprint,
    image_encoder,
    make_residual,
)
from residual_store.head import CosineHead

TINY_MODELS = ("uda-tiny-vit", "uda-tiny-rn")


class TinyBase:
    """A built tiny CLIP whose image encoder lives in one flat buffer, plus reference copies.

    A plain class, not a dataclass: hypothesis prints dataclass fields (whole tensors) on failure.
    """

    def __init__(self, name: str):
        self.name = name
        self.model = BaseSpec(name).build()
        self.flat = FlatParams(image_encoder(self.model))
        # what every restore must give back, as a flat copy and per parameter
        self.base_buffer = self.flat.buffer.clone()
        self.base_state = {n: p.detach().clone() for n, p in self.encoder.named_parameters()}
        self.fingerprint = fingerprint(self.encoder)
        self.dim = embed_dim(self.model)

    def __repr__(self) -> str:
        return f"TinyBase({self.name!r})"

    @property
    def encoder(self) -> torch.nn.Module:
        return image_encoder(self.model)

    @property
    def layout(self):
        return self.flat.layout

    def reset(self) -> None:
        """Put the base weights back, whatever a failed test left behind."""
        with torch.no_grad():
            self.flat.buffer.copy_(self.base_buffer)


def build_tiny(name: str) -> TinyBase:
    return TinyBase(name)


def random_tuned(base: dict[str, torch.Tensor], names: list[str], density: float, seed: int,
                 scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """`base` with a random `density` fraction of the entries of `names` moved by ~N(0, scale^2)."""
    g = torch.Generator().manual_seed(seed)
    tuned = {n: t.clone() for n, t in base.items()}
    for name in names:
        flat = tuned[name].view(-1)
        k = max(1, round(density * flat.numel()))
        pos = torch.randperm(flat.numel(), generator=g)[:k]
        flat[pos] += torch.randn(k, generator=g) * scale
    return tuned


def random_flat_deltas(numel: int, nnz: int, seed: int, scale: float = 1e-3
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sorted, duplicate-free flat index of `nnz` random positions and random float32 deltas."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(numel, generator=g)[:nnz].sort().values
    return index, torch.randn(nnz, generator=g) * scale


def make_head(kind: str, dim: int, num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "cosine":
        return CosineHead.from_text_features(torch.randn(num_classes, dim), logit_scale=100.0)
    head = TaskHead(dim, num_classes)
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
        head.bn.num_batches_tracked.fill_(7)
    return head.eval()


def residual_for(tiny: TinyBase, tuned: dict[str, torch.Tensor], *, task: str = "Ar2Cl",
                 classes: tuple[str, ...] = ("cat", "dog", "cow"), head_kind: str = "bn-ln-linear",
                 fingerprint_: str | None = None, base_activation: str | None = None) -> Residual:
    """The residual of `tuned` against `tiny`'s base, with a fresh head."""
    return make_residual(
        extract(tiny.base_state, tuned), make_head(head_kind, tiny.dim, len(classes)),
        task=task, classes=list(classes), base_model=tiny.name, base_pretrained="random",
        base_fingerprint=fingerprint_ or tiny.fingerprint, metrics={"accuracy": 0.5},
        config={"tau": 1e-6}, base_activation=base_activation)


# --- crafting (bad) files directly with safetensors ---------------------------------------------

def valid_parts(fp: str = "ab" * 32, dim: int = 64) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a small valid uda-residual/1 file over uda-tiny-vit's names."""
    tensors = {
        "visual.conv1.weight.indices": torch.tensor([1, 5, 9, 40], dtype=torch.int64),
        "visual.conv1.weight.values": torch.tensor([1e-3, -2e-3, 3e-6, 4e-1]),
        "visual.ln_post.bias.indices": torch.tensor([0, 3], dtype=torch.int32),
        "visual.ln_post.bias.values": torch.tensor([5e-4, -5e-4]),
        "head.fc.weight": torch.full((3, dim), 0.01),
    }
    metadata = {
        "format": "uda-residual/1", "task": "Ar2Cl", "base_model": "uda-tiny-vit",
        "base_pretrained": "random", "base_fingerprint": fp,
        "classes": json.dumps(["cat", "dog", "cow"]), "dsp": "0", "metrics": "{}", "config": "{}",
        "head_type": "cosine",
    }
    metadata["dsp"] = str(dsp_of(tensors))
    return tensors, metadata


def dsp_of(tensors: dict[str, torch.Tensor]) -> int:
    """What a correct `dsp` entry says: changed encoder weights + head parameters."""
    return sum(t.numel() for k, t in tensors.items()
               if k.endswith(".indices") or (k.startswith("head.") and not k.endswith(
                   ("running_mean", "running_var", "num_batches_tracked"))))


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], fix_dsp: bool = True) -> bytes:
    """safetensors bytes of `tensors`; `dsp` recomputed unless the test wants it wrong."""
    metadata = dict(metadata)
    if fix_dsp:
        metadata["dsp"] = str(dsp_of(tensors))
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def split_header(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def edit_header(blob: bytes, edit) -> bytes:
    """`blob` with its JSON header passed through `edit(header) -> None` (in place)."""
    header, data = split_header(blob)
    edit(header)
    return join_header(header, data)
