"""JSON bodies of the HTTP answers, built from the model thread's BatchResult."""
from __future__ import annotations

from typing import Any

import torch

from server.catalog import TaskVersion
from server.worker import BatchResult


def predict_body(result: BatchResult, top_k: int) -> dict[str, Any]:
    """`/predict`: per image the top-k {label, index, score}, best first."""
    k = min(top_k, result.scores.shape[1])
    values, indices = torch.topk(result.scores, k, dim=1)
    predictions = [
        {"top_k": [{"label": result.classes[i], "index": i, "score": s}
                   for i, s in zip(row_idx.tolist(), row_val.tolist())]}
        for row_idx, row_val in zip(indices, values)
    ]
    return {"task": result.task, "version": result.version, "predictions": predictions,
            "timing": timing(result)}


def timing(result: BatchResult) -> dict[str, float]:
    return {"queue_ms": round(result.queue_ms, 3), "swap_ms": round(result.swap_ms, 3),
            "model_ms": round(result.model_ms, 3)}


def v2_model_body(tv: TaskVersion) -> dict[str, Any]:
    """Open Inference Protocol v2 model metadata of a task."""
    n_classes = len(tv.classes)
    return {
        "name": tv.task,
        "versions": [str(tv.version)],
        "platform": "pytorch_uda_residual",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "class_index", "datatype": "INT64", "shape": [-1]},
                    {"name": "scores", "datatype": "FP32", "shape": [-1, n_classes]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
        "parameters": {"classes": tv.classes, "sha256": tv.sha256},
    }
