"""metrics.py on small hand-computed cases: the confusion matrix's orientation (rows = true
class), accuracy, VisDA's mean per-class accuracy over the classes that have images only, and
a JSON-friendly summary (None, never NaN) for a class without images and for no images at all."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.metrics import (accuracy, classification_summary, confusion_matrix,
                             mean_class_accuracy, per_class_accuracy)

NAMES = ["cat", "dog", "owl"]
# 6 images: 3 cats (2 right, 1 called dog), 2 dogs (1 right, 1 called owl), 1 owl (right)
LABELS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 2, 2]
MATRIX = [[2, 1, 0],
          [0, 1, 1],
          [0, 0, 1]]


def test_confusion_matrix_rows_are_true_classes():
    m = confusion_matrix(torch.tensor(PREDS), torch.tensor(LABELS), 3)
    assert m.dtype == torch.int64
    assert m.tolist() == MATRIX
    # one image of true class 0 predicted as 1: row 0, column 1, not the other way round
    assert confusion_matrix(torch.tensor([1]), torch.tensor([0]), 2).tolist() == [[0, 1], [0, 0]]


def test_confusion_matrix_takes_numpy_and_lists():
    assert confusion_matrix(np.array(PREDS), np.array(LABELS), 3).tolist() == MATRIX
    assert confusion_matrix(PREDS, LABELS, 3).tolist() == MATRIX


def test_confusion_matrix_of_nothing_is_zeros():
    m = confusion_matrix(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3)
    assert m.dtype == torch.int64 and m.tolist() == [[0] * 3] * 3
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("preds, labels, k, message", [
    ([0, 3], [0, 1], 3, r"preds must lie in \[0, 2\], got values in \[0, 3\]"),
    ([0, 1], [-1, 1], 3, r"labels must lie in \[0, 2\]"),
    ([0, 1], [0], 3, "differ in length: 2 vs 1"),
    ([[0, 1]], [[0, 1]], 3, "one-dimensional"),
    ([0.0, 1.0], [0, 1], 3, "integer class indices"),
    ([0], [0], 0, "num_classes must be >= 1, got 0"),
])
def test_confusion_matrix_refuses_bad_input(preds, labels, k, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(preds, labels, k)


def test_accuracies_by_hand():
    m = torch.tensor(MATRIX)
    assert accuracy(m) == pytest.approx(4 / 6)
    assert per_class_accuracy(m) == pytest.approx([2 / 3, 1 / 2, 1.0])
    # the mean of the classes' accuracies, not the image-weighted 4/6
    assert mean_class_accuracy(m) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_summary_from_logits_equals_summary_from_predictions():
    logits = torch.full((6, 3), -1.0)
    logits[torch.arange(6), torch.tensor(PREDS)] = 2.0
    assert classification_summary(logits, LABELS, NAMES) == classification_summary(PREDS, LABELS, NAMES)


def test_summary_by_hand():
    s = classification_summary(torch.tensor(PREDS), torch.tensor(LABELS), NAMES)
    assert s["images"] == 6
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["mean_class_accuracy"] == pytest.approx(13 / 18)
    assert s["confusion"] == MATRIX
    assert [c["class"] for c in s["per_class"]] == NAMES
    assert [c["images"] for c in s["per_class"]] == [3, 2, 1]
    assert [c["accuracy"] for c in s["per_class"]] == pytest.approx([2 / 3, 1 / 2, 1.0])
    json.dumps(s, allow_nan=False)


def test_a_class_without_images_is_left_out_of_the_mean():
    # 4 classes, none of the images is a "bat"; one owl is wrongly called a bat
    names = ["cat", "dog", "owl", "bat"]
    labels = [0, 0, 1, 2, 2]
    preds = [0, 1, 1, 2, 3]
    s = classification_summary(preds, labels, names)
    bat = s["per_class"][3]
    assert bat == {"class": "bat", "accuracy": None, "images": 0}
    assert s["confusion"][2] == [0, 0, 1, 1]  # the owl called a bat is in the owl row
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["mean_class_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("scores", [torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), []])
def test_empty_input_gives_none_not_nan(scores):
    s = classification_summary(scores, torch.zeros(0, dtype=torch.long), NAMES)
    assert s["images"] == 0
    assert s["accuracy"] is None and s["mean_class_accuracy"] is None
    assert s["per_class"] == [{"class": n, "accuracy": None, "images": 0} for n in NAMES]
    assert s["confusion"] == [[0] * 3] * 3
    json.dumps(s, allow_nan=False)


def test_summary_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="logits have 2 columns but there are 3 class names"):
        classification_summary(torch.zeros(4, 2), [0, 1, 0, 1], NAMES)
    with pytest.raises(ValueError, match=r"logits \[N, C\] or predictions \[N\]"):
        classification_summary(torch.zeros(2, 3, 1), [0, 1], NAMES)
    with pytest.raises(ValueError, match="class_names is empty"):
        classification_summary([0], [0], [])
