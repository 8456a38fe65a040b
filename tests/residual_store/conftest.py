"""Fixtures for the store tests: residual blobs, a directory store, a Redis store, and `store`
parametrized over both so one conformance suite checks every backend."""
from __future__ import annotations

import functools
import json
import os
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from residual_store.stores.directory import DirectoryStore

REDIS_URL = os.environ.get("UDA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_blob(task: str = "Ar2Cl", seed: int = 0, classes: tuple[str, ...] = ("cat", "dog", "cow"),
              **metadata: str) -> bytes:
    """A valid uda-residual/1 blob built with safetensors directly (no base model needed).

    `seed` changes the values, so blobs of different seeds have different sha256s; keyword
    arguments override metadata entries. Same arguments, same bytes (memoized: safetensors
    writes the metadata in hash-map order, which differs from call to call).
    """
    return _make_blob(task, seed, tuple(classes), tuple(sorted(metadata.items())))


@functools.lru_cache(maxsize=None)
def _make_blob(task: str, seed: int, classes: tuple[str, ...],
               metadata: tuple[tuple[str, str], ...]) -> bytes:
    g = torch.Generator().manual_seed(seed)
    dim = 8
    tensors = {
        "visual.conv1.weight.indices": torch.tensor([1, 5, 9, 40], dtype=torch.int64),
        "visual.conv1.weight.values": torch.randn(4, generator=g) * 1e-3,
        "visual.ln_post.bias.indices": torch.tensor([0, 3], dtype=torch.int32),
        "visual.ln_post.bias.values": torch.randn(2, generator=g) * 1e-3,
        "head.fc.weight": torch.randn(len(classes), dim, generator=g),
    }
    dsp = 4 + 2 + len(classes) * dim  # changed encoder weights + head parameters
    meta = {
        "format": "uda-residual/1", "task": task, "base_model": "uda-tiny-vit",
        "base_pretrained": "random", "base_fingerprint": "ab" * 32,
        "classes": json.dumps(list(classes)), "dsp": str(dsp), "metrics": "{}", "config": "{}",
        "head_type": "cosine",
    }
    meta.update(metadata)
    return st_save(tensors, metadata=meta)


@pytest.fixture
def blob_factory():
    """make_blob as a fixture (test modules cannot import conftest reliably)."""
    return make_blob


@pytest.fixture
def dir_store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "store")


def _redis_or_skip():
    """A client on REDIS_URL; skip when Redis does not answer, but fail in CI (CI=true)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        client.close()
        msg = f"Redis at {REDIS_URL} does not answer ({e}); start one with `make redis`"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return client


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def redis_client():
    client = _redis_or_skip()
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client):
    """A prefix unique to the test; afterwards deletes ONLY the keys under it."""
    prefix = f"uda-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def redis_store(redis_prefix):
    from residual_store.stores.redis_store import RedisStore

    store = RedisStore(REDIS_URL, prefix=redis_prefix)
    yield store
    store.close()


@pytest.fixture(params=["directory", "redis"])
def store(request):
    return request.getfixturevalue("dir_store" if request.param == "directory" else "redis_store")


def store_spec(store) -> tuple[str, dict]:
    """(url, kwargs) that reopen the same store in another process."""
    if isinstance(store, DirectoryStore):
        return str(store.root), {}
    return REDIS_URL, {"prefix": store.prefix}


@pytest.fixture
def backend():
    """Backend-specific surgery the conformance tests need: what a crash or a bit flip leaves."""
    return Backend()


class Backend:
    @staticmethod
    def spec(store) -> tuple[str, dict]:
        return store_spec(store)

    @staticmethod
    def corrupt(store, task: str, version: int) -> None:
        """Flip one byte of a stored blob behind the store's back."""
        if isinstance(store, DirectoryStore):
            path = store.root / "tasks" / task / f"v{version:08d}.safetensors"
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            key = f"{store.prefix}blob:{task}:{version}"
            data = bytearray(store._r.get(key))
            data[-1] ^= 0xFF
            store._r.set(key, bytes(data))

    @staticmethod
    def half_publish(store, task: str, blob: bytes) -> None:
        """Leave what a publisher SIGKILLed between writing the blob and the index leaves."""
        if isinstance(store, DirectoryStore):
            folder = store.root / "tasks" / task
            current = store.info(task).version
            (folder / f"v{current + 1:08d}.safetensors").write_bytes(blob)
            (folder / f".tmp-index.json.{os.getpid()}").write_bytes(b"{half")
        else:
            version = store._r.incr(f"{store.prefix}seq:{task}")
            store._r.set(f"{store.prefix}blob:{task}:{version}", blob, px=3_600_000)

    @staticmethod
    def touched(store) -> list[str]:
        """Everything the store has written so far (files or keys)."""
        if isinstance(store, DirectoryStore):
            return sorted(str(p) for p in store.root.rglob("*")) if store.root.exists() else []
        return sorted(k.decode() for k in store._r.scan_iter(match=f"{store.prefix}*"))
