"""cmkd.py against hand-computed values: Gini impurity with its column-sum normalisation, the
ramp, and cmkd_loss's per-sample weights and stop-gradients (checked on gradients, not only
values, with finite differences of a plain-Python reference that freezes what must be frozen)."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.cmkd import cmkd_loss, gini_impurity, ramp

P = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]


def test_gini_value_uses_column_sums_and_weights():
    probs = torch.tensor(P, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    # S = (0.8, 0.8, 0.4); row 0: 1 - (0.49/0.8 + 0.04/0.8 + 0.01/0.4) = 0.3125
    # row 1: 1 - (0.01/0.8 + 0.36/0.8 + 0.09/0.4) = 0.3125; weighted sum 1.0*0.3125 + 0.5*0.3125
    assert gini_impurity(probs, weights).item() == pytest.approx(0.46875, abs=1e-12)
    # a scalar weight of 1 sums over the batch (not the mean)
    assert gini_impurity(probs, 1.0).item() == pytest.approx(0.625, abs=1e-12)


def test_gini_gradient_treats_column_sum_as_constant():
    probs = torch.tensor(P, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    gini_impurity(probs, weights).backward()
    # d/dP_ic = -2 w_i P_ic / S_c with S_c constant
    expected = [[-2 * 0.7 / 0.8, -2 * 0.2 / 0.8, -2 * 0.1 / 0.4],
                [-2 * 0.5 * 0.1 / 0.8, -2 * 0.5 * 0.6 / 0.8, -2 * 0.5 * 0.3 / 0.4]]
    torch.testing.assert_close(probs.grad, torch.tensor(expected, dtype=torch.float64))
    # d/dw_i is the per-sample impurity
    torch.testing.assert_close(weights.grad, torch.tensor([0.3125, 0.3125], dtype=torch.float64))


def test_ramp_values():
    assert ramp(0) == 0.0
    assert ramp(10000) == pytest.approx(2 / (1 + math.exp(-1)) - 1)  # 0.4621...
    assert ramp(10000) == pytest.approx(0.46211715726, abs=1e-10)
    assert ramp(5000) == pytest.approx(0.24491866240, abs=1e-10)
    assert ramp(25000) == ramp(10000)  # capped at T_max
    assert ramp(30, max_steps=60) == pytest.approx(2 / (1 + math.exp(-0.5)) - 1)
    assert ramp(60, max_steps=60, gamma=10.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert ramp(-5) == 0.0


# -- a plain-Python reference of METHOD.md losses 2-7 ------------------------------------------

def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def col_sums(rows):
    return [sum(r[c] for r in rows) for c in range(len(rows[0]))]


def gini(rows, weights, sums):
    return sum(w * (1 - sum(r[c] ** 2 / sums[c] for c in range(len(r)))) for r, w in zip(rows, weights))


def frozen(th, tg):
    """What the method holds constant, computed from the current logits."""
    ph = [softmax(r) for r in th]
    pg = [softmax(r) for r in tg]
    alpha = [math.exp(-sum(g[c] * math.log(g[c] / h[c]) for c in range(len(g)))) for g, h in zip(pg, ph)]
    pm = [[0.5 * (h[c] + g[c]) for c in range(len(h))] for h, g in zip(ph, pg)]
    return {"alpha": alpha, "pg": pg, "S_h": col_sums(ph), "S_m": col_sums(pm), "S_g": col_sums(pg)}


def reference(th, tg, sg, y, lam, fz, l1=0.25, l2=0.1, l3=0.025):
    """The losses as functions of the logits with `fz` (stop-gradient quantities) held fixed."""
    ph = [softmax(r) for r in th]
    pg = [softmax(r) for r in tg]
    pm = [[0.5 * (h[c] + g[c]) for c in range(len(h))] for h, g in zip(ph, fz["pg"])]
    task = l1 * lam * gini(ph, fz["alpha"], fz["S_h"])
    distill = l1 * lam * gini(pm, [1 - a for a in fz["alpha"]], fz["S_m"])
    ce = sum(-math.log(softmax(r)[k]) for r, k in zip(sg, y)) / len(y)
    reg = l2 * ce + l3 * lam * gini(pg, [1.0] * len(pg), fz["S_g"])
    return {"task": task, "distill": distill, "reg": reg, "total": task + distill + reg}


def finite_difference(fn, rows, eps=1e-6):
    grad = []
    for i in range(len(rows)):
        g_row = []
        for c in range(len(rows[i])):
            up = [r[:] for r in rows]
            down = [r[:] for r in rows]
            up[i][c] += eps
            down[i][c] -= eps
            g_row.append((fn(up) - fn(down)) / (2 * eps))
        grad.append(g_row)
    return torch.tensor(grad, dtype=torch.float64)


TH = [[1.2, -0.3, 0.4], [0.1, 0.9, -1.1], [-0.5, 0.2, 0.8], [2.0, 0.0, -1.0]]
TG = [[0.3, 0.1, -0.2], [1.5, -0.4, 0.2], [-1.0, 1.1, 0.4], [0.6, 0.6, -0.3]]
SG = [[0.2, -0.1, 1.0], [1.3, 0.3, -0.6], [-0.2, 0.9, 0.1]]
Y = [2, 0, 1]
LAM = 0.37


@pytest.fixture
def inputs():
    th = torch.tensor(TH, dtype=torch.float64, requires_grad=True)
    tg = torch.tensor(TG, dtype=torch.float64, requires_grad=True)
    sg = torch.tensor(SG, dtype=torch.float64, requires_grad=True)
    return th, tg, sg, torch.tensor(Y)


def test_cmkd_values_match_reference(inputs):
    th, tg, sg, y = inputs
    out = cmkd_loss(th, tg, sg, y, LAM)
    ref = reference(TH, TG, SG, Y, LAM, frozen(TH, TG))
    for key in ("task", "distill", "reg", "total"):
        assert out[key].item() == pytest.approx(ref[key], abs=1e-12), key
    assert out["total"].item() == pytest.approx(
        (out["task"] + out["distill"] + out["reg"]).item(), abs=1e-15)


def test_alpha_is_exp_minus_kl_of_clip_given_head(inputs):
    """Per-sample weights: a sample whose heads agree gets alpha = 1 (all in task, none in
    distill); KL(p_g || p_h), not the reverse, decides the others."""
    th, tg, sg, y = inputs
    same = th.detach().clone()
    out = cmkd_loss(same, same.clone(), sg, y, 1.0)
    assert out["distill"].item() == pytest.approx(0.0, abs=1e-15)
    ph = [softmax(r) for r in TH]
    pg = [softmax(r) for r in TG]
    alpha_fwd = [math.exp(-sum(g[c] * math.log(g[c] / h[c]) for c in range(3))) for g, h in zip(pg, ph)]
    task_fwd = 0.25 * gini(ph, alpha_fwd, col_sums(ph))
    assert cmkd_loss(th, tg, sg, y, 1.0)["task"].item() == pytest.approx(task_fwd, abs=1e-12)
    alpha_rev = [math.exp(-sum(h[c] * math.log(h[c] / g[c]) for c in range(3))) for g, h in zip(pg, ph)]
    assert abs(0.25 * gini(ph, alpha_rev, col_sums(ph)) - task_fwd) > 1e-4  # the test can tell


@pytest.mark.parametrize("key", ["task", "distill", "reg", "total"])
def test_cmkd_gradients_hold_stopgrad_quantities_fixed(inputs, key):
    th, tg, sg, y = inputs
    out = cmkd_loss(th, tg, sg, y, LAM)
    g_th, g_tg, g_sg = torch.autograd.grad(out[key], (th, tg, sg), allow_unused=True)
    fz = frozen(TH, TG)
    zero = torch.zeros(4, 3, dtype=torch.float64)
    ref_th = finite_difference(lambda r: reference(r, TG, SG, Y, LAM, fz)[key], TH)
    ref_tg = finite_difference(lambda r: reference(TH, r, SG, Y, LAM, fz)[key], TG)
    ref_sg = finite_difference(lambda r: reference(TH, TG, r, Y, LAM, fz)[key], SG)
    torch.testing.assert_close(zero if g_th is None else g_th, ref_th, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(zero if g_tg is None else g_tg, ref_tg, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(torch.zeros(3, 3, dtype=torch.float64) if g_sg is None else g_sg,
                               ref_sg, atol=1e-8, rtol=1e-6)


def test_stop_gradients_cut_the_clip_head_out_of_task_and_distill(inputs):
    th, tg, sg, y = inputs
    out = cmkd_loss(th, tg, sg, y, LAM)
    # alpha has no gradient and p_m uses stopgrad(p_g): the CLIP head's target logits only
    # receive gradient from L_reg; the task head's only from L_task and L_distill.
    for key in ("task", "distill"):
        (g,) = torch.autograd.grad(out[key], (tg,), retain_graph=True, allow_unused=True)
        assert g is None or torch.count_nonzero(g) == 0, key
    (g,) = torch.autograd.grad(out["reg"], (th,), retain_graph=True, allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0
    (g,) = torch.autograd.grad(out["reg"], (tg,), retain_graph=True)
    assert torch.count_nonzero(g) > 0


def test_zero_ramp_leaves_only_the_source_clip_ce(inputs):
    th, tg, sg, y = inputs
    out = cmkd_loss(th, tg, sg, y, 0.0)
    assert out["task"].item() == 0.0 and out["distill"].item() == 0.0
    ce = torch.nn.functional.cross_entropy(sg, y)
    assert out["reg"].item() == pytest.approx(0.1 * ce.item(), abs=1e-15)
