"""Applying a residual to the flat buffer and restoring it exactly.

Restoring copies the saved originals back (no subtraction), so the base weights stay
bit-identical however many swaps run.
"""
from __future__ import annotations

import contextlib

import torch

from residual_store.residual import FlatResidual


def apply_residual(buffer: torch.Tensor, residual: FlatResidual) -> torch.Tensor:
    """Add the residual's deltas in place and return the originals to restore.

    Semantics: saved = w[idx]; w[idx] += values; return saved
    """
    saved = buffer.index_select(0, residual.index)
    buffer.index_add_(0, residual.index, residual.values)
    return saved


def restore_residual(buffer: torch.Tensor, index: torch.Tensor, saved: torch.Tensor) -> None:
    """Put the originals back exactly.

    Semantics: w[idx] = saved
    """
    # index_copy_ takes int64 only; widening an int32 index is one sequential pass, cheap next
    # to the random-access copy (the flat row of bench/swap.py includes it).
    buffer.index_copy_(0, index.long(), saved)


@contextlib.contextmanager
def residual_applied(buffer: torch.Tensor, residual: FlatResidual):
    """The buffer holds base + residual inside the block and exactly the base after it."""
    saved = apply_residual(buffer, residual)
    try:
        yield
    finally:
        restore_residual(buffer, residual.index, saved)
