"""Training checkpoints in the workdir: weights, optimiser, scheduler, RNG states and step.

Written atomically (temporary file, then rename) so a crash mid-write leaves the previous
checkpoint; read with `torch.load(weights_only=True)`, so loading never unpickles code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from residual_store.atomic import atomic_write
from residual_store.errors import one_line
from trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Durable before the old checkpoint is replaced: a power cut must not leave neither.
    atomic_write(path, lambda f: torch.save(state, f))
    logger.info("checkpoint at step %d written to %s", state["step"], path)


def load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: run once without --resume (or point "
                              "--workdir at the run to continue)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError on bad files
        raise CheckpointError(f"checkpoint {path} is not readable ({one_line(e, 200)}): "
                              "delete it and start again without --resume") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a uda-train checkpoint (no training state in it): "
                              "point --workdir at a uda-train run, or start without --resume")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """`field: saved -> current` for every training field that changed."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in fields if saved.get(k) != current.get(k)]
