"""Errors the trainer raises on purpose; the CLI prints each as one line, never a traceback."""
from __future__ import annotations


class TrainerError(Exception):
    """Base class of the trainer's deliberate errors."""


class ConfigError(TrainerError, ValueError):
    """Invalid hyperparameters or flags; the message lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(TrainerError, ValueError):
    """The image folders cannot be used (missing, empty, classes that do not match...)."""


class CheckpointError(TrainerError, ValueError):
    """A checkpoint that cannot be resumed (missing, unreadable, from another configuration)."""


class PublishError(TrainerError):
    """The artifact was saved but could not be published; the message says how to do it later."""
