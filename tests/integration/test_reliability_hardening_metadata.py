"""Issue 24, item 6: whoever can publish cannot amplify.

A 15 MB `config` was re-read by every reconcile, 15 MB of class labels went into every answer,
a 100,000-class head made a 15 KB /v2 request answer 72 MB. The residual's metadata is bounded
(residual_store.residual.MAX_CLASSES, MAX_CLASS_NAME, MAX_METADATA_VALUE) at publish and import,
and at load for what a publisher wrote around the validation.
"""
from __future__ import annotations

import json

import httpx
import pytest
import reliability_support as rs

from residual_store import to_bytes
from residual_store.errors import ResidualFormatError
from residual_store.residual import MAX_CLASS_NAME, MAX_CLASSES, MAX_METADATA_VALUE, inspect_blob
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import random_residual

pytestmark = pytest.mark.integration


def _oversized(kind: str) -> bytes:
    classes = {"head_width": [f"c{i}" for i in range(MAX_CLASSES + 1)],
               "class_name": ["c0", "x" * (MAX_CLASS_NAME + 1)]}.get(kind, ["c0", "c1"])
    r = random_residual(rs.base(), "A", classes, base_model=rs.MODEL, seed=9)
    if kind == "config":
        r.metadata["config"] = json.dumps({"pad": "x" * MAX_METADATA_VALUE})
    return to_bytes(r)


KINDS = ["config", "class_name", "head_width"]


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_metadata_is_refused_at_publish(tmp_path, kind):
    with pytest.raises(ResidualFormatError, match="limit"):
        open_store(str(tmp_path / "store")).publish("A", _oversized(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_oversized_metadata_written_around_the_store_is_refused_at_load(tmp_path, kind):
    r = rs.shared_redis_or_skip()
    prefix = rs.unique_prefix()
    try:
        blob = _oversized(kind)
        good = rs.make_version("A", 1)
        url = f"{rs.SHARED_REDIS_URL}?prefix={prefix}"
        open_store(url).publish("A", good.blob)
        # the metadata of a valid residual, so the catalog switches and the load finds out
        rs.raw_publish(r, prefix, "A", blob, inspect_blob(good.blob), announced_sha=None)
        cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=url, port=0)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            resp = rs.predict(http, "A")
            assert resp.status_code == 503 and "limit" in resp.json()["detail"], resp.text
    finally:
        rs.delete_prefix(r, prefix)
