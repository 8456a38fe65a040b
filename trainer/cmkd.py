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


ALPHA_MODES = ("kl", "entropy", "fixed")
ENTROPY_EPS = 1e-5  # inside the log of the entropy trade-off, as the authors' code has it


@torch.no_grad()
def trade_off(target_logits: torch.Tensor, target_clip_logits: torch.Tensor, mode: str = "kl",
              value: float = 0.5) -> torch.Tensor:
    """The per-sample trade-off alpha between L_task and L_distill (no gradient).

    Semantics: kl:      alpha_i = exp(-KL(p_g,i || p_h,i))   (the paper; the released code's order)
               entropy: alpha_i = exp(-H(p_h,i)), H = -sum_c p log(p + 1e-5)  (the authors' variant)
               fixed:   alpha_i = value
    """
    if mode == "kl":
        # KL(p_g || p_h) as the released code computes it (the paper's text has it reversed).
        log_g = target_clip_logits.log_softmax(dim=1)
        log_h = target_logits.log_softmax(dim=1)
        return torch.exp(-(log_g.exp() * (log_g - log_h)).sum(dim=1))
    if mode == "entropy":
        p_h = target_logits.softmax(dim=1)
        return torch.exp((p_h * torch.log(p_h + ENTROPY_EPS)).sum(dim=1))
    if mode == "fixed":
        return torch.full(target_logits.shape[:1], float(value), dtype=target_logits.dtype,
                          device=target_logits.device)
    raise ValueError(f"unknown trade-off {mode!r}: expected one of {ALPHA_MODES}")


def cmkd_loss(target_logits: torch.Tensor, target_clip_logits: torch.Tensor,
              source_clip_logits: torch.Tensor, source_labels: torch.Tensor, lam: float | torch.Tensor,
              lambda1: float = 0.25, lambda2: float = 0.1, lambda3: float = 0.025,
              alpha_mode: str = "kl", alpha_value: float = 0.5, task_weight: float = 1.0,
              distill_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The CMKD terms for one batch: {"task", "distill", "reg", "total"}.

    Semantics: p_h = softmax(target_logits), p_g = softmax(target_clip_logits)
               alpha = trade_off(..., alpha_mode)              (no gradient; "kl" by default)
               task    = task_weight * lambda1 * lam * GI(p_h, alpha)
               distill = distill_weight * lambda1 * lam * GI(0.5 * (p_h + stopgrad(p_g)), 1 - alpha)
               reg     = lambda2 * CE(source_clip_logits, y_s) + lambda3 * lam * GI(p_g, 1)
               total   = task + distill + reg
    The two weights are the paper's ablations (1 and 1 is the method).
    """
    p_h = target_logits.softmax(dim=1)
    p_g = target_clip_logits.softmax(dim=1)
    alpha = trade_off(target_logits, target_clip_logits, alpha_mode, alpha_value)
    task = task_weight * lambda1 * lam * gini_impurity(p_h, alpha)
    p_m = 0.5 * (p_h + p_g.detach())
    distill = distill_weight * lambda1 * lam * gini_impurity(p_m, 1.0 - alpha)
    reg = lambda2 * F.cross_entropy(source_clip_logits, source_labels) \
        + lambda3 * lam * gini_impurity(p_g, 1.0)
    return {"task": task, "distill": distill, "reg": reg, "total": task + distill + reg}
