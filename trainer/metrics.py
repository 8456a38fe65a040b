"""Classification metrics of a target evaluation: the confusion matrix, overall accuracy and
VisDA's mean per-class accuracy, as pure functions on tensors (numpy arrays and lists work too).

`classification_summary` returns plain Python values only (int, float, None, str, lists), so
`json.dumps` takes it as is; a metric with nothing to average over is None, never NaN.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _as_labels(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional (one class index per image), "
                         f"got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    return t.long()


def confusion_matrix(preds: Any, labels: Any, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs: int64 [num_classes, num_classes].

    Semantics: M[t, p] = #{i : labels_i = t and preds_i = p}
               row t sums to the images of class t; trace(M) = correct predictions
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    preds, labels = _as_labels(preds, "preds"), _as_labels(labels, "labels")
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels differ in length: {preds.numel()} vs {labels.numel()}")
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}], "
                             f"got values in [{int(t.min())}, {int(t.max())}]")
    flat = labels.cpu() * num_classes + preds.cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy(matrix: torch.Tensor) -> float | None:
    """Fraction of all images predicted correctly; None when there are no images.

    Semantics: acc = trace(M) / sum(M)
    """
    total = int(matrix.sum())
    return int(matrix.diagonal().sum()) / total if total else None


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Recall of each true class; None for a class without images.

    Semantics: acc_c = M[c, c] / sum_p M[c, p]   (None where sum_p M[c, p] = 0)
    """
    rows = matrix.sum(dim=1).tolist()
    diag = matrix.diagonal().tolist()
    return [d / n if n else None for d, n in zip(diag, rows)]


def mean_class_accuracy(matrix: torch.Tensor) -> float | None:
    """VisDA's metric: the mean of per-class accuracies over the classes that have images.

    Semantics: mca = mean_{c : sum_p M[c, p] > 0} acc_c   (None when no class has images)
    """
    present = [a for a in per_class_accuracy(matrix) if a is not None]
    return sum(present) / len(present) if present else None


def classification_summary(logits_or_preds: Any, labels: Any,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """A JSON-friendly report of one evaluation.

    `logits_or_preds` is either logits [N, C] (the prediction is the argmax of each row) or
    predicted class indices [N]; `labels` are the true indices [N]; C = len(class_names).
    Returns {"images", "accuracy", "mean_class_accuracy", "per_class": [{"class", "accuracy",
    "images"}, ...], "confusion": M as a list of rows (true class) of counts per predicted class}.

    Semantics: preds = argmax_c logits[:, c] if 2-D else logits_or_preds
               M = confusion_matrix(preds, labels, C); accuracy = trace(M) / sum(M)
               mean_class_accuracy = mean over classes with images of M[c, c] / sum_p M[c, p]
    """
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names is empty: a summary needs at least one class")
    scores = torch.as_tensor(logits_or_preds)
    if scores.dim() == 2:
        if scores.shape[1] != len(names):
            raise ValueError(f"logits have {scores.shape[1]} columns but there are "
                             f"{len(names)} class names")
        preds = scores.argmax(dim=1) if scores.shape[0] else scores.new_zeros(0, dtype=torch.long)
    elif scores.dim() == 1:
        preds = scores
    else:
        raise ValueError(f"logits_or_preds must be logits [N, C] or predictions [N], "
                         f"got shape {tuple(scores.shape)}")
    matrix = confusion_matrix(preds, labels, len(names))
    per_class = [{"class": name, "accuracy": acc, "images": int(n)}
                 for name, acc, n in zip(names, per_class_accuracy(matrix), matrix.sum(dim=1).tolist())]
    return {
        "images": int(matrix.sum()),
        "accuracy": accuracy(matrix),
        "mean_class_accuracy": mean_class_accuracy(matrix),
        "per_class": per_class,
        "confusion": matrix.tolist(),
    }
