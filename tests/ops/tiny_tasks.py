"""Tiny but real residuals for the ops tests: random sparse deltas + a TaskHead on uda-tiny-vit."""
from __future__ import annotations

import functools

import torch

from residual_store.base import BaseSpec, embed_dim, fingerprint, image_encoder
from residual_store.head import TaskHead
from residual_store.residual import make_residual, to_bytes

MODEL = "uda-tiny-vit"
CLASSES = ("circle", "square", "triangle")


@functools.lru_cache(maxsize=1)
def _base() -> tuple[dict[str, torch.Tensor], str, int, str]:
    spec = BaseSpec(MODEL)
    model = spec.build()
    encoder = image_encoder(model)
    params = {n: p.detach() for n, p in encoder.named_parameters()}
    return params, fingerprint(encoder), embed_dim(model), spec.pretrained_label


def residual_blob(task: str, seed: int, base_fingerprint: str | None = None) -> bytes:
    """A valid uda-residual/1 file for `task`; pass `base_fingerprint` to forge a foreign base."""
    params, fp, dim, pretrained = _base()
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    # A few parameters, ~1% of their elements each, deltas of RST size: sparse like a real task.
    for name in sorted(params)[seed % 3::7][:4]:
        n = params[name].numel()
        k = max(1, n // 100)
        idx = torch.randperm(n, generator=gen)[:k].sort().values
        deltas[name] = (idx, torch.randn(k, generator=gen) * 1e-3)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        head = TaskHead(dim, len(CLASSES)).eval()
    residual = make_residual(deltas, head, task=task, classes=list(CLASSES), base_model=MODEL,
                             base_pretrained=pretrained, base_fingerprint=base_fingerprint or fp)
    return to_bytes(residual)
