"""Exact fp32 where residuals are measured and served (residual_store/numerics.py)."""
from __future__ import annotations

import pytest
import torch

from residual_store import BaseSpec
from residual_store.numerics import fp32_precision, set_fp32_precision
from server.engine import SwapEngine


def current() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.fixture
def restore_flags():
    saved = current()
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_the_server_turns_tf32_off_for_matmuls_and_convolutions(restore_flags):
    set_fp32_precision("tf32")  # PyTorch's default for cuDNN convolutions
    SwapEngine(BaseSpec("uda-tiny-vit"), "cpu").setup()
    assert current() == ("ieee", "ieee")


def test_the_context_puts_the_previous_settings_back(restore_flags):
    set_fp32_precision("tf32")
    with fp32_precision("ieee"):
        assert current() == ("ieee", "ieee")
    assert current() == ("tf32", "tf32")
    with pytest.raises(ValueError, match="expected one of"):
        set_fp32_precision("bf16")
