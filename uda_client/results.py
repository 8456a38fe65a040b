"""Typed answers of uda-serve."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ClassScore:
    label: str  # the class name
    index: int  # its position in the task's classes
    score: float  # softmax probability


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's top-k classes, best first."""

    image: str  # the file name, or "image[i]" for bytes and PIL images
    top_k: tuple[ClassScore, ...]

    @property
    def label(self) -> str:
        return self.top_k[0].label

    @property
    def score(self) -> float:
        return self.top_k[0].score


@dataclasses.dataclass(frozen=True)
class PredictResult:
    """The answer to one request: the task's served version and one Prediction per image."""

    task: str
    version: int
    predictions: tuple[Prediction, ...]
    timing: dict[str, float]  # the server's queue_ms, swap_ms, model_ms
    latency_ms: float  # measured by the client, retries included

    @classmethod
    def from_json(cls, body: dict[str, Any], names: list[str], latency_ms: float) -> PredictResult:
        predictions = tuple(
            Prediction(name, tuple(ClassScore(str(c["label"]), int(c["index"]), float(c["score"]))
                                   for c in p["top_k"]))
            for name, p in zip(names, body["predictions"], strict=True))
        return cls(str(body["task"]), int(body["version"]), predictions, dict(body.get("timing", {})),
                   latency_ms)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A task as GET /tasks lists it."""

    name: str
    version: int | None  # None when no version of it can be served
    classes: tuple[str, ...]
    servable: bool

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> TaskInfo:
        return cls(str(entry["task"]), entry.get("version"), tuple(entry.get("classes") or ()),
                   bool(entry.get("servable")))
