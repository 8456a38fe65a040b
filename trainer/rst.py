"""Residual Sparse Training (METHOD.md): after every optimiser step, image-encoder weights
that moved by at most tau from the pre-trained w0 are put back to w0 exactly.

With the encoder's parameters as views into one flat buffer (residual_store.flat), the mask
step is one vectorised pass over the buffer instead of a loop over ~150 tensors.
"""
from __future__ import annotations

import logging

import torch

from residual_store.flat import FlatParams

logger = logging.getLogger(__name__)


class ResidualSparsifier:
    """Keeps a copy of w0 and resets small deltas after each optimiser step.

    Semantics: keep = |w - w0| <= tau;  w[keep] = w0[keep]
    """

    def __init__(self, flat: FlatParams, tau: float, w0: torch.Tensor | None = None):
        if tau < 0:
            raise ValueError(f"tau {tau!r} must be >= 0")
        self.flat = flat
        self.tau = float(tau)
        # w0 is the reference of the residual: a separate copy, never a view of the buffer
        # (a caller that already keeps one passes it in, to not hold w0 twice).
        self.w0 = flat.buffer.detach().clone() if w0 is None else w0.detach()
        if self.w0.data_ptr() == flat.buffer.data_ptr():
            raise ValueError("w0 must be a copy of the flat buffer, not the buffer itself")

    @torch.no_grad()
    def step(self) -> int:
        """Reset the small deltas; returns how many encoder weights still differ from w0."""
        w = self.flat.buffer
        keep = torch.le(torch.sub(w, self.w0).abs_(), self.tau)
        torch.where(keep, self.w0, w, out=w)  # elementwise, so writing into w is safe
        return int(keep.numel() - keep.sum())

    @torch.no_grad()
    def nnz(self) -> int:
        """Encoder weights that differ from w0 now."""
        return int(torch.ne(self.flat.buffer, self.w0).sum())
