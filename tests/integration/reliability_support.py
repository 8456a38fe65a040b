"""Helpers of the reliability suite (tests/integration/test_reliability_*.py, the soak smoke test):
tiny residuals with their reference scores, a private redis-server, writes that bypass the
store's validation (what a buggy or hostile publisher could leave in Redis), metric reading,
real calls held open at a chosen point (Held).

Imported by plain name (`import reliability_support as rs`): pytest puts this folder on sys.path.
Nothing here stands in for the server: tests talk to a real uvicorn over loopback.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from residual_store import BaseSpec, Residual, to_bytes
from residual_store.flat import ParamLayout
from residual_store.preprocess import eval_transform
from residual_store.stores import open_store
from server.cache import cached_nbytes, resident_form
from server.ports import free_port
from server.synthetic import image_bytes, random_residual, reference_scores

MODEL = "uda-tiny-vit"
SIZE = 32  # input size of uda-tiny-vit
SHARED_REDIS_URL = os.environ.get("UDA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "reliability-admin-token"
IMAGES = [image_bytes(s, fmt=f) for s, f in ((101, "PNG"), (102, "JPEG"), (103, "WEBP"))]

T = TypeVar("T")


# -- the base and its residuals ---------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def base(model: str = MODEL) -> torch.nn.Module:
    """The tiny base as a server builds it (seeded random init), built once per process."""
    return BaseSpec(model).build()


def tensors(blobs: list[bytes], size: int = SIZE) -> torch.Tensor:
    t = eval_transform(size)
    return torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


@dataclasses.dataclass(frozen=True)
class Version:
    """One residual of a task: its bytes and what a server must answer for IMAGES."""

    residual: Residual
    blob: bytes
    expected: torch.Tensor  # (len(IMAGES), C) softmax scores

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()


def cache_budget(residuals: float, *versions: Version) -> int:
    """--cache-bytes for `residuals` of the largest of `versions` (1.5: one fits, never two)."""
    layout = ParamLayout.of(base().visual)
    largest = max(cached_nbytes(resident_form(v.residual, layout), v.residual.build_head()) for v in versions)
    return int(residuals * largest)


def make_version(task: str, seed: int, n_classes: int = 3, **kw: Any) -> Version:
    model = base()
    r = random_residual(model, task, [f"c{i}" for i in range(n_classes)], base_model=MODEL,
                        seed=seed, **kw)
    return Version(r, to_bytes(r), reference_scores(model, r, tensors(IMAGES)))


def publish_versions(store_url: str, tasks: Sequence[str], first_seed: int) -> dict[str, Version]:
    """One version of each task (seeds first_seed, first_seed + 1, ...) published to the store."""
    store = open_store(store_url)
    versions = {task: make_version(task, first_seed + i) for i, task in enumerate(tasks)}
    for task, v in versions.items():
        store.publish(task, v.blob)
    return versions


# -- HTTP ----------------------------------------------------------------------------------------


def predict(client: httpx.Client, task: str, image: int = 0, **params: Any) -> httpx.Response:
    return client.post("/predict", params={"task": task, "top_k": 1000, **params},
                       content=IMAGES[image], headers={"content-type": "image/png"})


def scores_of(resp: httpx.Response, n_classes: int) -> torch.Tensor:
    """The full score vector of a /predict answer with top_k >= the number of classes."""
    out = torch.full((n_classes,), float("nan"))
    for item in resp.json()["predictions"][0]["top_k"]:
        out[item["index"]] = item["score"]
    return out


def matches(resp: httpx.Response, version: Version, image: int = 0, atol: float = 1e-5) -> bool:
    expected = version.expected[image]
    got = scores_of(resp, expected.numel())
    return bool(torch.allclose(got, expected, rtol=0, atol=atol))


def admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def wait_for(what: str, probe: Callable[[], T], timeout: float = 120.0, interval: float = 0.05) -> T:
    """Poll `probe` until it returns a truthy value; fail naming `what` if it never does.

    The timeout only bounds a hang on a slow shared machine; no test asserts on durations.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as e:  # not there yet: keep polling, remember why
            last, value = e, None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"gave up waiting for {what}" + (f" (last error: {last})" if last else ""))


def metric(srv_or_text: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample value from an EmbeddedServer's registry or from /metrics text."""
    if hasattr(srv_or_text, "runtime"):
        return srv_or_text.runtime.metrics.registry.get_sample_value(name, labels or {})
    for family in text_string_to_metric_families(srv_or_text):
        for s in family.samples:
            if s.name == name and (labels or {}) == {k: v for k, v in s.labels.items()
                                                      if k in (labels or {})}:
                return s.value
    return None


def task_label_values(metrics_text: str) -> set[str]:
    """Every value of a `task` label in /metrics."""
    return {s.labels["task"] for f in text_string_to_metric_families(metrics_text)
            for s in f.samples if "task" in s.labels}



def uda_serve_command() -> list[str]:
    script = shutil.which("uda-serve", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "server.cli"]


# -- Redis -----------------------------------------------------------------------------------------


def shared_redis_or_skip() -> redis.Redis:
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {SHARED_REDIS_URL} does not answer: {e}")
        pytest.skip(f"Redis at {SHARED_REDIS_URL} does not answer ({e}); start one with `make redis`")
    return client


def unique_prefix() -> str:
    return f"uda-rel:{uuid.uuid4().hex[:12]}:"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


class PrivateRedis:
    """A redis-server of our own on a free loopback port, which tests may stop, restart and
    flush (the shared one on 6379 is never touched). AOF on, so a restart keeps the data
    unless `restart(empty=True)`."""

    def __init__(self, tmp: Path, extra: list[str] | None = None):
        path = shutil.which("redis-server")
        if not path:
            msg = "redis-server is not installed (scripts/ensure-redis.sh, run by make test, installs it)"
            if os.environ.get("CI") == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        self.bin = path
        self.dir = tmp
        self.port = free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **kw)

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            [self.bin, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--protected-mode", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c = self.client()
        wait_for("the private redis-server", lambda: self.proc.poll() is None and c.ping(), 30)
        c.close()
        return self

    def stop(self) -> None:
        """SIGTERM: redis-server writes its AOF and exits (like a pod being restarted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, empty: bool = False) -> None:
        self.stop()
        if empty:
            for p in self.dir.iterdir():
                if p.name.startswith(("appendonly", "dump")):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.start()


def raw_publish(r: redis.Redis, prefix: str, task: str, blob: bytes, metadata: dict[str, str], *,
                announced_sha: str | None = None, event: bool = True) -> int:
    """Make `blob` the current version of `task` by writing RedisStore's keys directly, with no
    validation at all (what a buggy or hostile publisher with write access could do).

    `announced_sha` is the sha256 recorded in the index and the event (default: the blob's);
    `event=False` leaves out the pub/sub message, as if the server had missed it.
    """
    sha = announced_sha or hashlib.sha256(blob).hexdigest()
    version = int(r.incr(f"{prefix}seq:{task}"))
    r.set(f"{prefix}blob:{task}:{version}", blob)
    record = {"sha256": sha, "size": len(blob), "created": time.time(), "metadata": metadata}
    r.hset(f"{prefix}index:{task}", mapping={f"v:{version}": json.dumps(record), "current": version})
    r.sadd(f"{prefix}tasks", task)
    if event:
        r.publish(f"{prefix}events", json.dumps({"kind": "publish", "task": task,
                                                  "version": version, "sha256": sha}))
    return version


class Held:
    """Wraps a real call (a loader, a store read): the calls whose arguments start with `args`
    wait for `release`, so a test can hold one part of the server open at a chosen point and
    run the racing order every time. `arrived` is set when the first one waits; with
    `after=True` the call is made first and its result held back (the read is done, what the
    caller does with it is not)."""

    def __init__(self, call: Callable[..., T], *args: Any, after: bool = False):
        self.call, self.args, self.after = call, args, after
        self.arrived, self.release = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kw: Any) -> T:
        if args[:len(self.args)] != self.args:
            return self.call(*args, **kw)
        result = self.call(*args, **kw) if self.after else None
        self.arrived.set()
        assert self.release.wait(60), "never released"
        return result if self.after else self.call(*args, **kw)


def reference_first_frame(version: Version, png: bytes) -> torch.Tensor:
    """Reference scores of one image (PNG bytes) under `version`."""
    return reference_scores(base(), version.residual, tensors([png]))[0]
