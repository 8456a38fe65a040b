"""The optional FixMatch term (METHOD.md): confident pseudo-labels from a weak view supervise
the prediction on a strong view, for the task head and for the CLIP head alike."""
from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT = 0.5


def fixmatch_term(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                  threshold: float = 0.95) -> torch.Tensor:
    """mean over the batch of CE(strong, argmax p(weak)) where max p(weak) >= threshold.

    Semantics: p = softmax(stopgrad(weak)); mask_i = [max_c p_ic >= threshold]
               loss = mean_i(CE(strong_i, argmax_c p_ic) * mask_i)
    """
    with torch.no_grad():
        conf, pseudo = weak_logits.softmax(dim=1).max(dim=1)
        mask = (conf >= threshold).to(strong_logits.dtype)
    return (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()


def fixmatch_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                  weak_clip_logits: torch.Tensor, strong_clip_logits: torch.Tensor,
                  threshold: float = 0.95, weight: float = WEIGHT) -> torch.Tensor:
    """weight * (task-head term + CLIP-head term), each with its own pseudo-labels (the
    authors' fixmatch_factor, 0.5, on each term)."""
    return weight * (fixmatch_term(weak_logits, strong_logits, threshold)
                     + fixmatch_term(weak_clip_logits, strong_clip_logits, threshold))
