"""Issue 6, point 2: a bad residual never replaces a good one.

Each bad file is made the current version of a task in Redis, mostly by writing RedisStore's
keys directly (the store's own publish validates, a hostile or buggy writer need not). The
server must refuse it with a logged reason and `uda_residuals_refused_total{reason}`, keep
serving v1 bit-identically, for a resident task and for one that is not resident, and leave
the other tasks alone.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import struct

import httpx
import pytest
import reliability_support as rs
import torch
from safetensors.torch import save as st_save

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

WARM, COLD, BYSTANDER = "Warm", "Cold", "Other"


class _Mkdir:
    """Unpickling this runs os.mkdir(marker): proof, by a side effect, that pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _tensors(residual) -> dict[str, torch.Tensor]:
    out = {}
    for name, (idx, val) in residual.deltas.items():
        out[f"visual.{name}.indices"] = idx.to(torch.int32).contiguous()
        out[f"visual.{name}.values"] = val.to(torch.float32).contiguous()
    for key, t in residual.head.items():
        out[f"head.{key}"] = t.contiguous()
    return out


def _with_nan(residual) -> bytes:
    t = _tensors(residual)
    key = next(k for k in t if k.endswith(".values"))
    t[key] = t[key].clone()
    t[key][0] = float("nan")
    t[key][-1] = float("inf")
    return st_save(t, metadata=residual.metadata)


def _out_of_range(residual) -> bytes:
    params = dict(rs.base().visual.named_parameters())
    name, (idx, val) = next(iter(residual.deltas.items()))
    idx = idx.clone().to(torch.int64)
    idx[-1] = params[name].numel() + 7  # still sorted, one past the end of the parameter
    t = _tensors(residual)
    t[f"visual.{name}.indices"] = idx
    return st_save(t, metadata=residual.metadata)


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"visual.conv1.weight.values": torch.zeros(3)}, buf)
    return buf.getvalue()


def bad_blobs(good: rs.Version, marker: str) -> dict[str, tuple[bytes, str | None, str]]:
    """kind -> (blob, announced sha256 or None for the blob's own, expected refusal reason)."""
    r = good.residual
    return {
        "out_of_range_index": (_out_of_range(r), None, "invalid_format"),
        "nan_inf_values": (_with_nan(r), None, "invalid_format"),
        "truncated": (good.blob[: len(good.blob) // 2], None, "invalid_format"),
        "wrong_sha256": (good.blob, "ab" * 32, "integrity"),
        "oversized_header": (struct.pack("<Q", 1 << 40) + b'{"__metadata__":{}}', None, "invalid_format"),
        "pickle_named_safetensors": (pickle.dumps(_Mkdir(marker)), None, "invalid_format"),
        "torch_save_zip": (_torch_zip(), None, "invalid_format"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    client = rs.shared_redis_or_skip()
    prefix = rs.unique_prefix()
    url = f"{rs.SHARED_REDIS_URL}?prefix={prefix}"
    store = open_store(url)
    v1 = {t: rs.make_version(t, seed) for t, seed in ((WARM, 1), (BYSTANDER, 3))}
    for task, v in v1.items():
        store.publish(task, v.blob)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=url, port=0, reconcile_interval=0.3,
                      admin_token=rs.ADMIN_TOKEN)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        golden = {}
        for task in v1:
            resp = rs.predict(http, task)
            assert resp.status_code == 200 and rs.matches(resp, v1[task]), resp.text
            golden[task] = resp.json()["predictions"]
        yield {"srv": srv, "http": http, "store": store, "redis": client, "prefix": prefix,
               "v1": v1, "golden": golden, "marker": str(tmp_path_factory.mktemp("m") / "pwned")}
    store.close()
    rs.delete_prefix(client, prefix)
    client.close()


def _publish_bad(world, task: str, kind: str) -> tuple[int, str]:
    good_v2 = rs.make_version(task, 50 + len(kind))  # metadata of a real residual of this base
    blob, sha, reason = bad_blobs(good_v2, world["marker"])[kind]
    if kind == "out_of_range_index":
        version = world["store"].publish(task, blob).version  # passes the store's own check
    else:
        version = rs.raw_publish(world["redis"], world["prefix"], task, blob,
                                 dict(good_v2.residual.metadata), announced_sha=sha)
    return version, reason


KINDS = ["out_of_range_index", "nan_inf_values", "truncated", "wrong_sha256", "oversized_header",
         "pickle_named_safetensors", "torch_save_zip"]  # the keys of bad_blobs


@pytest.mark.parametrize("task", [WARM, COLD])
@pytest.mark.parametrize("kind", KINDS + ["wrong_base_fingerprint"])
def test_bad_residual_is_refused_and_v1_keeps_serving(world, task, kind, caplog):
    srv, http = world["srv"], world["http"]
    if task == COLD:
        # A fresh cold task per kind: the store retains 5 versions, and v1 must still be there
        # to be loaded again after the refusals.
        task = f"{COLD}-{kind}"[:64]
        world["v1"][task] = v1 = rs.make_version(task, 2)
        world["store"].publish(task, v1.blob)
        resp = rs.wait_for(f"{task} served", lambda: (r := rs.predict(http, task)).status_code == 200 and r)
        assert rs.matches(resp, v1)
        world["golden"][task] = resp.json()["predictions"]
        resp = http.post(f"/admin/tasks/{task}/unload", headers=rs.admin())
        assert resp.status_code == 200 and resp.json()["resident"] is False  # cold from here on
    reason = "base_mismatch" if kind == "wrong_base_fingerprint" else None
    before = {r: rs.metric(srv, "uda_residuals_refused_total", {"reason": r}) or 0.0
              for r in ("invalid_format", "integrity", "base_mismatch")}
    with caplog.at_level(logging.ERROR, logger="server.catalog"):
        if kind == "wrong_base_fingerprint":
            alien = rs.make_version(task, 77, base_fingerprint="0" * 64)
            version = world["store"].publish(task, alien.blob).version
        else:
            version, reason = _publish_bad(world, task, kind)
        entry = rs.wait_for(f"{task} v{version} refused", lambda: next(
            e for e in http.get("/tasks").json()["tasks"]
            if e["task"] == task and (e["refused"] or {}).get("version") == version))
    assert entry["refused"]["reason"] == reason and entry["refused"]["detail"]
    assert entry["version"] == 1 and entry["servable"] is True
    assert rs.metric(srv, "uda_residuals_refused_total", {"reason": reason}) == before[reason] + 1
    logged = [r.getMessage() for r in caplog.records if r.name == "server.catalog"]
    assert any(f"refused {task} v{version} ({reason})" in m and "v1 keeps serving" in m
               for m in logged), logged

    for t in (task, BYSTANDER):  # v1 serves bit-identically, the other task too
        resp = rs.predict(http, t)
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == 1
        assert resp.json()["predictions"] == world["golden"][t]
    assert world["store"].info(task).version == version  # the store still points at the bad one
    assert not os.path.exists(world["marker"]), "the pickle payload ran"
    fp = http.get("/admin/fingerprint", headers=rs.admin()).json()
    assert fp["unchanged"] is True


def test_a_good_version_after_bad_ones_is_served(world):
    http = world["http"]
    v2 = rs.make_version(WARM, 99)
    version = world["store"].publish(WARM, v2.blob).version
    resp = rs.wait_for(f"{WARM} v{version} served",
                       lambda: (r := rs.predict(http, WARM)).json()["version"] == version and r)
    assert rs.matches(resp, v2)
    entry = next(e for e in http.get("/tasks").json()["tasks"] if e["task"] == WARM)
    assert entry["refused"] is None


def test_a_bad_first_version_of_a_new_task_is_refused_once(world):
    """A new task is switched to without reading its blob; the first request's load finds it
    bad. From then on it is refused like a new task of another base: no fetch, no parse and no
    refusal counted again per request or per reconcile, until a good version is published."""
    srv, http, task = world["srv"], world["http"], "Fresh-bad"
    good = rs.make_version(task, 71)
    rs.raw_publish(world["redis"], world["prefix"], task, good.blob[: len(good.blob) // 2],
                   dict(good.residual.metadata))  # truncated, with a real residual's metadata
    rs.wait_for(f"{task} known", lambda: srv.runtime.catalog.get(task))
    refused = rs.metric(srv, "uda_residuals_refused_total", {"reason": "invalid_format"})
    first = rs.predict(http, task)
    assert first.status_code == 503 and "refused (invalid_format)" in first.json()["detail"], first.text
    loads = rs.metric(srv, "uda_residual_cache_misses_total")
    for _ in range(2):  # a whole reconcile round after the refusal: one ended once the next began
        started = srv.runtime.catalog.last_reconcile
        rs.wait_for("a reconcile round", lambda: srv.runtime.catalog.last_reconcile > started)
    for _ in range(3):
        resp = rs.predict(http, task)
        assert resp.status_code == 503 and resp.json()["detail"] == first.json()["detail"]
    assert rs.metric(srv, "uda_residual_cache_misses_total") == loads  # not loaded again
    assert rs.metric(srv, "uda_residuals_refused_total", {"reason": "invalid_format"}) == refused + 1
    entry = next(e for e in http.get("/tasks").json()["tasks"] if e["task"] == task)
    assert entry["servable"] is False and entry["refused"]["reason"] == "invalid_format"

    version = world["store"].publish(task, good.blob).version
    resp = rs.wait_for(f"{task} v{version} served", lambda: (r := rs.predict(http, task)).status_code == 200 and r)
    assert resp.json()["version"] == version and rs.matches(resp, good)


def test_an_admin_load_of_a_bad_version_says_why_and_takes_the_task_out(world):
    srv, http, task = world["srv"], world["http"], "Fresh-bad-admin"
    good = rs.make_version(task, 72)
    rs.raw_publish(world["redis"], world["prefix"], task, good.blob[: len(good.blob) // 2],
                   dict(good.residual.metadata))
    rs.wait_for(f"{task} known", lambda: srv.runtime.catalog.get(task))
    resp = http.post(f"/admin/tasks/{task}/load", headers=rs.admin())
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"] == "conflict" and "refused (invalid_format)" in resp.json()["detail"]
    entry = next(e for e in http.get("/tasks").json()["tasks"] if e["task"] == task)
    assert entry["servable"] is False and entry["refused"]["reason"] == "invalid_format"
    after = rs.predict(http, task)
    assert after.status_code == 503 and "refused (invalid_format)" in after.json()["detail"]
