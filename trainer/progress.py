"""Progress as plain log lines, for runs whose stderr is not a terminal (a Kubernetes Job, a
pipe, nohup): tqdm draws nothing there, so every `every` steps, and at least every `seconds`,
one line says where the run is:

    step 1200/10000 (12.0%) cls 0.412 task 0.031 distill 0.027 reg 0.208 total 0.678 ramp 0.06
    lr 2.5e-06 nnz 91234 acc 81.20% | 3.1 steps/s, ETA 47m20s
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("trainer.progress")

LOSS_KEYS = ("cls", "task", "distill", "reg", "fixmatch", "total")


class ProgressLog:
    """Decides when a line is due and writes it; the clock is injectable for tests."""

    def __init__(self, total_steps: int, every: int = 50, seconds: float = 30.0,
                 start_step: int = 0, clock: Callable[[], float] = time.monotonic):
        self.total, self.every, self.seconds = total_steps, every, seconds
        self.clock = clock
        self.start_step, self.start_time = start_step, clock()
        self.last_step, self.last_time = start_step, self.start_time

    def due(self, step: int, now: float) -> bool:
        return (step - self.last_step >= self.every or now - self.last_time >= self.seconds
                or step >= self.total)

    def step(self, step: int, values: dict[str, float], evaluation: dict[str, Any] | None = None) -> None:
        now = self.clock()
        if not self.due(step, now):
            return
        self.last_step, self.last_time = step, now
        logger.info("%s", self.line(step, values, evaluation, now))

    def line(self, step: int, values: dict[str, float], evaluation: dict[str, Any] | None,
             now: float) -> str:
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.1f}%)"]
        parts += [f"{k} {values[k]:.4g}" for k in LOSS_KEYS if k in values]
        if "ramp" in values:
            parts.append(f"ramp {values['ramp']:.3f}")
        if "lr" in values:
            parts.append(f"lr {values['lr']:.2e}")
        if "nnz" in values:
            parts.append(f"nnz {int(values['nnz'])}")
        if evaluation and evaluation.get("accuracy") is not None:
            parts.append(f"acc {100 * evaluation['accuracy']:.2f}%")
        done, elapsed = step - self.start_step, now - self.start_time
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"| {rate:.3g} steps/s, ETA {format_duration((self.total - step) / rate)}")
        return " ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
