"""Task heads stored densely in a residual file (tensors `head.*`).

Two kinds, named by the `head_type` metadata key:
- "bn-ln-linear": METHOD.md's trained head, BatchNorm1d(d) -> LayerNorm(d, eps=1e-6) ->
  Linear(d, C, bias=False);
- "cosine": CLIP's zero-shot head, logits = normalize(z) @ W^T with W = logit_scale * T
  (class text features), used by `uda-train --method zeroshot`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

HEAD_TYPES = ("bn-ln-linear", "cosine")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class TaskHead(nn.Sequential):
    """BatchNorm1d -> LayerNorm -> Linear without bias; Linear weight ~ N(0, 0.001^2)."""

    head_type = "bn-ln-linear"

    def __init__(self, dim: int, num_classes: int):
        super().__init__(OrderedDict(
            bn=nn.BatchNorm1d(dim),
            ln=nn.LayerNorm(dim, eps=1e-6),
            fc=nn.Linear(dim, num_classes, bias=False),
        ))
        nn.init.normal_(self.fc.weight, std=0.001)


class CosineHead(nn.Module):
    """Zero-shot CLIP head: scaled cosine similarity to fixed class text features."""

    head_type = "cosine"

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, bias=False)

    @classmethod
    def from_text_features(cls, text_features: torch.Tensor, logit_scale: float) -> CosineHead:
        head = cls(text_features.shape[1], text_features.shape[0])
        with torch.no_grad():
            head.fc.weight.copy_(F.normalize(text_features, dim=-1) * logit_scale)
        return head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(F.normalize(z, dim=-1))


def build_head(head_type: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A head in eval mode from its stored tensors; raises ValueError naming what does not fit."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f"unknown head_type {head_type!r}: expected one of {HEAD_TYPES}")
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise ValueError("head.fc.weight missing or not a 2-D tensor")
    num_classes, dim = fc.shape
    if num_classes < 1 or dim < 1:
        # A [0, D] weight takes no bytes in a file, so D would be unbounded by the file's size:
        # refuse it before a head of width D is allocated.
        raise ValueError(f"head.fc.weight has shape {tuple(fc.shape)}: it needs at least one "
                         "class and one feature")
    cls = TaskHead if head_type == "bn-ln-linear" else CosineHead
    with torch.device("meta"):  # shapes only: nothing is allocated before they are checked
        expected = cls(dim, num_classes).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"head tensors do not fit a {head_type} head: missing {missing}, "
                         f"unexpected {unexpected}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"head.{key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
        if key.endswith("running_var") and bool((state[key] < 0).any()):
            raise ValueError(f"head.{key} has negative variances: every score would be NaN")
    head = cls(dim, num_classes)
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return head.eval()


def head_parameter_count(state: dict[str, torch.Tensor]) -> int:
    """Trainable head parameters (running statistics are buffers, not parameters)."""
    return sum(t.numel() for k, t in state.items() if not k.endswith(_BUFFER_SUFFIXES))
