"""Random residuals for tests and benchmarks, and an independent reference forward pass.

`random_residual` draws sparse deltas over the image encoder and a random task head, stamped
with the base's fingerprint so a server of that base accepts it. `reference_scores` computes
what a server must answer for it without the server's flat buffer or swap code: a deep copy of
the encoder with the deltas added to each parameter, then the head, then softmax.
"""
from __future__ import annotations

import copy
import io
import random

import torch
from PIL import Image
from torch import nn

from residual_store import Residual, TaskHead, embed_dim, fingerprint, make_residual
from residual_store.base import model_activation


def random_residual(model: nn.Module, task: str, classes: list[str], *, base_model: str,
                    base_pretrained: str = "random", density: float = 0.005, scale: float = 0.05,
                    seed: int = 0, base_fingerprint: str | None = None,
                    base_activation: str | None = None) -> Residual:
    """A residual changing about `density` of the encoder weights by N(0, scale^2) deltas;
    fingerprint and activation are the model's unless given."""
    g = torch.Generator().manual_seed(seed)
    visual = model.visual
    deltas = {}
    for name, p in visual.named_parameters():
        n = p.numel()
        k = max(1, int(n * density)) if n >= 16 else 0
        if k == 0:
            continue
        idx = torch.randperm(n, generator=g)[:k].sort().values
        deltas[name] = (idx, torch.randn(k, generator=g) * scale)
    head = TaskHead(embed_dim(model), len(classes))
    with torch.no_grad():
        head.fc.weight.normal_(0.0, 1.0, generator=g)
        head.bn.running_mean.normal_(0.0, 0.1, generator=g)
        head.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return make_residual(deltas, head.eval(), task=task, classes=classes, base_model=base_model,
                         base_pretrained=base_pretrained,
                         base_fingerprint=base_fingerprint or fingerprint(visual),
                         base_activation=base_activation or model_activation(model))


def reference_scores(model: nn.Module, residual: Residual, images: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """softmax(head(visual_with_residual(images))), computed on a copy of the encoder. With a
    `dtype` of bf16 the deltas are added in fp32 and the whole encoder is then cast: what
    rounding each target once (`uda-serve --precision bf16`) must give."""
    visual = copy.deepcopy(model.visual).eval()
    params = dict(visual.named_parameters())
    with torch.no_grad():
        for name, (idx, values) in residual.deltas.items():
            flat = params[name].data.view(-1)
            flat[idx.to(torch.int64)] += values.to(flat.dtype)
        visual.to(dtype)
        head = residual.build_head()
        return torch.softmax(head(visual(images.to(dtype)).float()), dim=-1)


def image_bytes(seed: int = 0, size: int = 40, fmt: str = "PNG") -> bytes:
    """A small random-looking RGB image encoded as `fmt` (PNG, JPEG, WEBP, GIF...)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    pixels = image.load()
    for _ in range(size * 4):
        pixels[rng.randrange(size), rng.randrange(size)] = tuple(rng.randrange(256) for _ in range(3))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()
