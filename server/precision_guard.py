"""Which tasks a bf16 server serves: the accuracies uda-train recorded, against --max-precision-drop.

uda-train measures each exported residual on its labelled target in fp32 and in bf16 exactly as
a server computes them, and records both in the residual's `metrics` metadata. A server running
bf16 refuses a task whose bf16 accuracy falls more than --max-precision-drop points below its
fp32 accuracy, with the two numbers in the reason; the task stays servable by a --precision fp32
server. A residual without the record (exported before it existed, or trained on an unlabelled
target without --target-eval) is refused by a bf16 server too: nothing says bf16 keeps its
accuracy. `--max-precision-drop inf` serves every task in bf16, recorded or not. A refusal is
decided when the file is loaded or verified, like a base mismatch (reason label "precision").
"""
from __future__ import annotations

import json
import math

from residual_store.precision import ACCURACY_KEY
from residual_store.residual import Residual
from server.errors import ServeError

REFERENCE = "fp32"


class PrecisionRefused(ServeError):
    """A residual whose recorded accuracy in the served precision is too far below fp32's."""


def recorded_accuracies(residual: Residual) -> dict[str, float]:
    """precision -> target accuracy (fraction) as uda-train recorded it; {} when absent."""
    try:
        metrics = json.loads(residual.metadata.get("metrics") or "{}")
    except json.JSONDecodeError:
        return {}
    record = metrics.get(ACCURACY_KEY) if isinstance(metrics, dict) else None
    if not isinstance(record, dict):
        return {}
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def check_served_precision(residual: Residual, precision: str, max_drop_points: float) -> None:
    """Raise PrecisionRefused unless `residual` may be served in `precision`.

    Semantics: served if precision == fp32, or max_drop == inf, or
    100 * (acc[fp32] - acc[precision]) <= max_drop; refused otherwise (a missing record too).
    """
    if precision == REFERENCE or math.isinf(max_drop_points):
        return
    record = recorded_accuracies(residual)
    if REFERENCE not in record or precision not in record:
        raise PrecisionRefused(
            f"no {precision} accuracy is recorded in this residual (exported by an older uda-train, "
            f"or its target had no labels and no --target-eval): serve it from a --precision "
            f"{REFERENCE} server, re-export it with uda-train and labelled target images, or "
            "start this server with --max-precision-drop inf")
    drop = round(100.0 * (record[REFERENCE] - record[precision]), 9)  # 0.8 - 0.795 is 0.50000001
    if drop > max_drop_points:
        raise PrecisionRefused(
            f"its {precision} accuracy {record[precision]:.2%} is {drop:.2f} points below its "
            f"{REFERENCE} accuracy {record[REFERENCE]:.2%} (--max-precision-drop "
            f"{max_drop_points:g}): serve it from a --precision {REFERENCE} server")
