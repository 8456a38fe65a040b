"""Fixtures shared by the integration tests."""
from __future__ import annotations

import pytest
import reliability_support as rs


@pytest.fixture(params=["directory", "redis"])
def store_url(request, tmp_path):
    """Each test once on a directory store and once on the shared Redis under its own key
    prefix (removed afterwards)."""
    if request.param == "directory":
        yield str(tmp_path / "store")
        return
    client = rs.shared_redis_or_skip()
    prefix = rs.unique_prefix()
    yield f"{rs.SHARED_REDIS_URL}?prefix={prefix}"
    rs.delete_prefix(client, prefix)
    client.close()
