"""Applying a residual to the flat buffer and restoring it exactly.

Restoring copies the saved originals back (no subtraction), so the base weights stay
bit-identical however many swaps run. A residual's flat index has no duplicates (validation
refuses them), so writing `saved + values` is the same fp32 sum an accumulating add computes;
take/put_ run in parallel over the index on a CPU, where index_select/index_add_ did not.
"""
from __future__ import annotations

import contextlib

import torch

from residual_store.residual import FlatResidual


def apply_residual(buffer: torch.Tensor, residual: FlatResidual) -> torch.Tensor:
    """Add the residual's deltas in place and return the originals to restore.

    Semantics: saved = w[idx]; w[idx] = saved + values; return saved
    On failure the buffer is left exactly as it was, never half applied.
    """
    index = residual.unpack().index  # put_ takes int64 only
    saved = buffer.take(index)
    try:
        buffer.put_(index, saved + residual.values)
    except BaseException:
        buffer.put_(index, saved)
        raise
    return saved


def apply_targets(buffer: torch.Tensor, targets: FlatResidual) -> torch.Tensor:
    """Write a residual's target values (base + delta, rounded once: residual_store/precision.py)
    in place and return the originals to restore.

    Semantics: saved = w[idx]; w[idx] = targets; return saved
    """
    index = targets.unpack().index
    saved = buffer.take(index)
    try:
        buffer.put_(index, targets.values)
    except BaseException:
        buffer.put_(index, saved)
        raise
    return saved


def restore_residual(buffer: torch.Tensor, index: torch.Tensor, saved: torch.Tensor) -> None:
    """Put the originals back exactly.

    Semantics: w[idx] = saved
    """
    buffer.put_(index.long(), saved)


@contextlib.contextmanager
def residual_applied(buffer: torch.Tensor, residual: FlatResidual):
    """The buffer holds base + residual inside the block and exactly the base after it."""
    saved = apply_residual(buffer, residual)
    try:
        yield
    finally:
        restore_residual(buffer, residual.index, saved)
