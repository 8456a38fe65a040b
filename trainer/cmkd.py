"""CMKD losses (METHOD.md, losses 2-7): Gini impurity, the ramp and the combined loss.

Names and meanings are a contract (issue 3); L_cls is added by the training loop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gini_impurity(probs: torch.Tensor, weights: torch.Tensor | float) -> torch.Tensor:
    """Class-balanced Gini impurity, weighted and summed over the batch.

    Semantics: S_c = sum_i P_ic (a constant: no gradient);
               GI = sum_i w_i * (1 - sum_c P_ic^2 / S_c)
    """
    # The column sum is a batch statistic used for balancing only; the method does not
    # differentiate through it. tiny keeps an all-zero column (underflow) at 0/tiny = 0.
    col = probs.sum(dim=0).detach().clamp_min(torch.finfo(probs.dtype).tiny)
    per_sample = 1.0 - (probs.pow(2) / col).sum(dim=1)
    return (weights * per_sample).sum()


def ramp(step: int, max_steps: int = 10000, gamma: float = 1.0) -> float:
    """lam(t) = 2 / (1 + exp(-gamma * t / T_max)) - 1 with t capped at T_max (0 -> 0, T_max -> 0.46)."""
    t = min(max(step, 0), max_steps)
    return 2.0 / (1.0 + math.exp(-gamma * t / max_steps)) - 1.0


def cmkd_loss(target_logits: torch.Tensor, target_clip_logits: torch.Tensor,
              source_clip_logits: torch.Tensor, source_labels: torch.Tensor, lam: float | torch.Tensor,
              lambda1: float = 0.25, lambda2: float = 0.1, lambda3: float = 0.025
              ) -> dict[str, torch.Tensor]:
    """The CMKD terms for one batch: {"task", "distill", "reg", "total"}.

    Semantics: p_h = softmax(target_logits), p_g = softmax(target_clip_logits)
               alpha_i = exp(-KL(p_g,i || p_h,i))            (no gradient)
               task    = lambda1 * lam * GI(p_h, alpha)
               distill = lambda1 * lam * GI(0.5 * (p_h + stopgrad(p_g)), 1 - alpha)
               reg     = lambda2 * CE(source_clip_logits, y_s) + lambda3 * lam * GI(p_g, 1)
               total   = task + distill + reg
    """
    p_h = target_logits.softmax(dim=1)
    p_g = target_clip_logits.softmax(dim=1)
    with torch.no_grad():
        # KL(p_g || p_h) as the released code computes it (the paper's text has it reversed).
        log_g = target_clip_logits.log_softmax(dim=1)
        log_h = target_logits.log_softmax(dim=1)
        alpha = torch.exp(-(log_g.exp() * (log_g - log_h)).sum(dim=1))
    task = lambda1 * lam * gini_impurity(p_h, alpha)
    p_m = 0.5 * (p_h + p_g.detach())
    distill = lambda1 * lam * gini_impurity(p_m, 1.0 - alpha)
    reg = lambda2 * F.cross_entropy(source_clip_logits, source_labels) \
        + lambda3 * lam * gini_impurity(p_g, 1.0)
    return {"task": task, "distill": distill, "reg": reg, "total": task + distill + reg}
