"""Fixtures for the server unit tests: the tiny base built once per session."""
from __future__ import annotations

import pytest

from residual_store import BaseSpec


@pytest.fixture(scope="session")
def tiny_model():
    """uda-tiny-vit with seeded random weights; tests must not modify it."""
    return BaseSpec("uda-tiny-vit").build()
