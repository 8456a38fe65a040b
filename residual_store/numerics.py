"""Which float32 arithmetic CUDA uses: exact IEEE fp32 wherever a residual is measured or served.

PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa): ViT's patch
embedding and nearly all of a ResNet would round RST's deltas (tau ~ 1e-6 on weights ~ 1e-2)
away. The server and the trainer's evaluation therefore set "ieee" for matmuls and
convolutions; TF32 is only a measured option (bench/precision.py). Only the new
`fp32_precision` API is used: mixing it with the legacy `allow_tf32` flags makes torch raise.
On a CPU these settings change nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FP32_MODES = ("ieee", "tf32")


def set_fp32_precision(mode: str) -> tuple[str, str]:
    """Set CUDA matmuls and cuDNN convolutions to `mode`; returns the previous (matmul, conv)."""
    if mode not in FP32_MODES:
        raise ValueError(f"fp32 precision {mode!r}: expected one of {FP32_MODES}")
    previous = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    return previous


@contextlib.contextmanager
def fp32_precision(mode: str) -> Iterator[None]:
    """`set_fp32_precision(mode)` inside, the previous settings back afterwards."""
    matmul, conv = set_fp32_precision(mode)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
