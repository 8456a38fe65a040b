"""The workdir of one run: its checkpoint (weights, optimiser, scheduler, RNG states and step),
which files make a run, and the lock that keeps a second process out.

Checkpoints are written atomically (temporary file, then rename) so a crash mid-write leaves
the previous checkpoint; read with `torch.load(weights_only=True)`, so loading never unpickles
code. A workdir holds one run: without --resume a workdir holding RUN_FILES is refused (or
emptied of them with --overwrite), and `locked()` holds an flock on WORKDIR/.uda-train.lock
for the process's lifetime, so two `uda-train` in one workdir cannot interleave.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from residual_store.atomic import atomic_write
from residual_store.errors import one_line
from trainer.errors import CheckpointError, TrainerError

logger = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"
# the files that mean "a run is here" (what --overwrite removes, with the plots)
RUN_FILES = (FILENAME, "train_log.jsonl", "report.json", "residual.safetensors")
OUTPUT_FILES = RUN_FILES + ("training.png", "confusion.png")
LOCK_FILE = ".uda-train.lock"


class WorkdirBusy(TrainerError):
    """Another uda-train process holds the workdir's lock."""


def workdir_problems(workdir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Why `workdir` cannot take this run, each with its fix (empty when it can)."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        return [f"--workdir {str(workdir)!r} is a file, not a folder: pick another --workdir"]
    existing = workdir
    while not existing.exists():  # the folder is created on the way: its nearest parent counts
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"--workdir {str(workdir)!r} is not writable ({str(existing)!r} refuses new "
                "files): pick a --workdir you may write to"]
    found = run_files(workdir)
    if resume and overwrite:
        return ["--resume continues the run in --workdir and --overwrite discards it: give one"]
    if found and not resume and not overwrite:
        return [f"--workdir {str(workdir)!r} already holds a run ({', '.join(found)}): continue "
                "it with --resume, start afresh with --overwrite, or pick another --workdir"]
    return []


def run_files(workdir: Path) -> list[str]:
    """The RUN_FILES present in `workdir`."""
    return [name for name in RUN_FILES if (Path(workdir) / name).exists()]


def remove_run(workdir: Path) -> list[str]:
    """--overwrite: remove the previous run's files (OUTPUT_FILES only); returns their names."""
    removed = []
    for name in OUTPUT_FILES:
        path = Path(workdir) / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    if removed:
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), workdir)
    return removed


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Hold WORKDIR/.uda-train.lock (created with the folder) until the block ends or the
    process dies; WorkdirBusy when another process holds it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirBusy(f"another uda-train is running in --workdir {str(workdir)!r} (it holds "
                          f"{path}): wait for it to finish, or pick another --workdir") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a newcomer)


def rng_states() -> dict[str, Any]:
    import torch  # here, not at import: `uda-train --help` should not wait for torch

    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    # Durable before the old checkpoint is replaced: a power cut must not leave neither.
    atomic_write(path, lambda f: torch.save(state, f))
    logger.info("checkpoint at step %d written to %s", state["step"], path)


def load(path: Path) -> dict[str, Any]:
    import torch

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
