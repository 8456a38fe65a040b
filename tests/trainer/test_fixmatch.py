"""fixmatch.py against METHOD.md on small tensors, with a plain-Python reference: pseudo-labels
are the argmax of the weak view, kept where max p >= 0.95; CE on the strong view, averaged over
the WHOLE batch (masked samples count as zero); 0.5 on each of the task-head and CLIP-head
terms, each with its own pseudo-labels; no gradient into the weak view."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from trainer.config import TrainConfig
from trainer.fixmatch import fixmatch_loss, fixmatch_term

# confidences: 0.99991 (kept, label 0), 1/3 (masked), 0.98670 (kept, label 1), 0.90941 (masked)
WEAK = [[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 3.0]]
# the strong view disagrees with the pseudo-labels, so its own argmax would give another loss
STRONG = [[0.1, 1.2, -0.4], [2.0, 0.3, 0.1], [0.9, -0.2, 0.4], [0.0, 0.5, 1.0]]
# the CLIP head: kept rows 1 (label 1) and 3 (label 0)
WEAK_CLIP = [[0.0, 1.0, 0.0], [0.0, 8.0, 0.0], [1.0, 1.0, 1.0], [7.0, 0.0, 0.0]]
STRONG_CLIP = [[0.3, -0.1, 0.2], [1.1, 0.2, -0.7], [0.0, 0.0, 0.4], [-0.5, 0.8, 0.6]]


def softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


def reference_term(weak, strong, threshold=0.95):
    total = 0.0
    for w, s in zip(weak, strong):
        p = softmax(w)
        if max(p) >= threshold:
            total += -math.log(softmax(s)[p.index(max(p))])
    return total / len(weak)  # the whole batch, masked samples included


def t(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def test_term_uses_weak_argmax_confident_samples_and_the_whole_batch_mean():
    value = fixmatch_term(t(WEAK), t(STRONG)).item()
    ce = [-math.log(softmax(STRONG[0])[0]), -math.log(softmax(STRONG[2])[1])]
    assert value == pytest.approx(sum(ce) / 4, abs=1e-12)
    assert value == pytest.approx(reference_term(WEAK, STRONG), abs=1e-12)
    assert abs(value - sum(ce) / 2) > 0.1  # a mean over the kept samples only would differ


def test_loss_is_half_of_each_head_term_with_its_own_pseudo_labels():
    loss = fixmatch_loss(t(WEAK), t(STRONG), t(WEAK_CLIP), t(STRONG_CLIP)).item()
    clip = reference_term(WEAK_CLIP, STRONG_CLIP)
    assert clip == pytest.approx((-math.log(softmax(STRONG_CLIP[1])[1])
                                  - math.log(softmax(STRONG_CLIP[3])[0])) / 4, abs=1e-12)
    assert loss == pytest.approx(0.5 * reference_term(WEAK, STRONG) + 0.5 * clip, abs=1e-12)


def test_threshold_keeps_a_confidence_equal_to_it():
    weak = t([[0.0, 2.0, 0.0]])
    conf = weak.softmax(dim=1).max().item()
    strong = t([[0.5, 0.1, 0.2]])
    kept = -math.log(softmax([0.5, 0.1, 0.2])[1])
    assert fixmatch_term(weak, strong, threshold=conf).item() == pytest.approx(kept, abs=1e-12)
    assert fixmatch_term(weak, strong, threshold=math.nextafter(conf, 1.0)).item() == 0.0


def test_no_gradient_into_the_weak_view_and_the_strong_gradient_is_masked_ce():
    weak, strong = t(WEAK, grad=True), t(STRONG, grad=True)
    weak_clip, strong_clip = t(WEAK_CLIP, grad=True), t(STRONG_CLIP, grad=True)
    loss = fixmatch_loss(weak, strong, weak_clip, strong_clip)
    grads = torch.autograd.grad(loss, (weak, strong, weak_clip, strong_clip), allow_unused=True)
    for g in (grads[0], grads[2]):
        assert g is None or torch.count_nonzero(g) == 0

    def expected(strong_rows, labels_and_mask):
        # d/ds_i of 0.5 * mean_i(mask_i * CE(s_i, y_i)) = 0.5 * mask_i * (softmax(s_i) - onehot(y_i)) / N
        rows = []
        for s, (label, keep) in zip(strong_rows, labels_and_mask):
            p = softmax(s)
            rows.append([0.5 * keep * (p[c] - (c == label)) / len(strong_rows) for c in range(3)])
        return torch.tensor(rows, dtype=torch.float64)

    torch.testing.assert_close(grads[1], expected(STRONG, [(0, 1), (0, 0), (1, 1), (2, 0)]))
    torch.testing.assert_close(grads[3], expected(STRONG_CLIP, [(1, 0), (1, 1), (0, 0), (0, 1)]))


def test_default_threshold_is_095():
    assert inspect.signature(fixmatch_loss).parameters["threshold"].default == 0.95
    assert inspect.signature(fixmatch_term).parameters["threshold"].default == 0.95
    assert TrainConfig().fixmatch_threshold == 0.95
