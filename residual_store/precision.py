"""Serving precisions: the image encoder's resident weights in fp32 (the reference) or bf16.

In bf16 the base is rounded to bf16 once, and a residual's TARGET values (base + delta, summed
exactly in fp32 from the fp32 base kept on the host) are rounded to bf16 once when it is loaded.
A swap writes those targets and restores the saved bf16 originals, so the resident weights are
bit-identical after any number of swaps, and a residual costs 2 bytes of values per entry plus
its index. Entries whose target rounds to the base's own bf16 value change nothing and are
dropped: with tau-sized deltas that is most of them. The task head always runs in fp32, on the
encoder's features cast back to fp32.

uda-train measures the exported residual in every precision here and records the accuracies in
the residual's `metrics` metadata (`accuracy_by_precision`, `agreement_with_fp32`); a bf16
server compares them with --max-precision-drop before serving a task (server/precision_guard.py).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from residual_store.flat import FlatParams, ParamLayout
from residual_store.residual import FlatResidual

PRECISIONS = ("fp32", "bf16")  # what uda-serve --precision offers; fp32 first: the reference
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ACCURACY_KEY = "accuracy_by_precision"  # metrics: precision -> target accuracy (fraction)
AGREEMENT_KEY = "agreement_with_fp32"  # metrics: precision -> share of top-1 equal to fp32's


def check_precision(precision: str) -> torch.dtype:
    """The weights' dtype of a serving precision (ValueError naming the choices otherwise)."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return DTYPES[precision]


@dataclasses.dataclass
class ServedWeights:
    """An image encoder flattened in a serving precision."""

    flat: FlatParams  # the resident weights (views of flat.buffer), in `dtype`
    master: torch.Tensor | None  # fp32 flat base on the host (None in fp32: flat.buffer is it)
    dtype: torch.dtype
    layout: ParamLayout  # the fp32 base's: what residuals are checked against and flattened over

    @property
    def exact(self) -> bool:
        return self.master is None

    def resident(self, residual: FlatResidual) -> FlatResidual:
        """What a swap writes: fp32 deltas as they are, or bf16 targets rounded once.

        Semantics (bf16): t = bf16(master[idx] + values); keep = t != bf16(master[idx]);
        return (idx[keep], t[keep])
        """
        if self.master is None:
            return FlatResidual(residual.index, residual.values.to(self.dtype))
        index = residual.index.to(self.master.device, torch.int64)
        base = self.master.take(index)
        targets = (base + residual.values.to(self.master.device, torch.float32)).to(self.dtype)
        keep = targets != base.to(self.dtype)
        return FlatResidual(index[keep], targets[keep])


def served_weights(visual: nn.Module, precision: str, huge_pages: bool | None = None) -> ServedWeights:
    """Flatten an fp32 `visual` (on its device) in `precision`; its parameters end up as views of
    the returned flat buffer. In bf16 the fp32 buffer stays, on the host, as the master copy."""
    dtype = check_precision(precision)
    flat = FlatParams(visual, huge_pages)
    if dtype == flat.buffer.dtype:
        return ServedWeights(flat, None, dtype, flat.layout)
    master = flat.buffer.cpu()  # same storage on a CPU; the device's fp32 copy is freed on a GPU
    visual.to(dtype)  # new storage: the parameters leave the fp32 buffer
    return ServedWeights(FlatParams(visual, huge_pages), master, dtype, flat.layout)


def encode(visual: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 features of `images` through an encoder whose weights are in `dtype`."""
    return visual(images.to(dtype)).float()
