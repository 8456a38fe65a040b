"""The network trained by CMKD: the trainable image encoder read by two heads.

- the task head h (residual_store.head.TaskHead), trained;
- the CLIP head, fixed: logits_clip = s * normalize(z) @ T^T with the class text features T
  (computed once by the frozen text encoder) and s = exp(logit_scale), frozen.
Both read the features z = f(x) of the TRAINABLE encoder f (METHOD.md).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class UdaNetwork(nn.Module):
    """x -> (task-head logits, CLIP-head logits); a list of batches -> one such pair per batch.

    A list is how training passes its domains (source, target weak view, target strong view):
    each goes through the network on its own, so the task head's BatchNorm normalises each
    domain with its own batch statistics, as the authors' code does. It is one call, so that
    DistributedDataParallel sees one forward per backward.
    """

    def __init__(self, visual: nn.Module, head: nn.Module, text_features: torch.Tensor,
                 logit_scale: float):
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("text_features", text_features.detach().clone(), persistent=False)
        self.logit_scale = float(logit_scale)

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        if isinstance(x, (list, tuple)):
            return [self._forward_one(part) for part in x]
        return self._forward_one(x)

    def _forward_one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.visual(x)
        clip = self.logit_scale * F.normalize(z, dim=-1) @ self.text_features.to(z.dtype).t()
        return self.head(z), clip

    def train(self, mode: bool = True) -> UdaNetwork:
        super().train(mode)
        if mode:
            freeze_batchnorm_stats(self.visual)
        return self


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """BatchNorm layers of the image encoder stay in eval mode (running statistics frozen);
    their affine parameters still train (METHOD.md, ResNet encoders)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def prompts(names: list[str], template: str) -> list[str]:
    """Prompt texts; folder-style names read better with spaces ("Alarm_Clock" -> "Alarm Clock")."""
    return [template.format(name.replace("_", " ")) for name in names]


@torch.no_grad()
def text_features(model: nn.Module, tokenizer, names: list[str], template: str,
                  device: torch.device) -> torch.Tensor:
    """T = normalize(g(tokenize(prompt(c)))) for every class, with the frozen text encoder."""
    tokens = tokenizer(prompts(names, template)).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def logit_scale(model: nn.Module) -> float:
    """s = exp(logit_scale) of the CLIP model, frozen."""
    return float(model.logit_scale.detach().exp())


def freeze_head_bn_bias(head: nn.Module) -> None:
    """The task head's BatchNorm bias stays at 0, as in the paper and the authors' code (their
    weights_init_classifier); its scale and the rest of the head train."""
    for m in head.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None:
            m.bias.requires_grad_(False)


def freeze_all_but_visual(model: nn.Module) -> None:
    """Only the image encoder trains; the text tower and logit scale are frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
