"""ResidualCache as a scripted sequence of state changes, asserting after each step."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from residual_store import FlatResidual
from server.cache import CachedResidual, ResidualCache
from server.errors import CacheFull, ShuttingDown
from server.metrics import Metrics


def entry(task: str, sha: str = "s1", nbytes: int = 100, version: int = 1) -> CachedResidual:
    flat = FlatResidual(torch.zeros(1, dtype=torch.int64), torch.zeros(1))
    return CachedResidual(task=task, sha256=sha, version=version, flat=flat, head=nn.Identity(),
                          classes=("a",), nnz=1, dsp=2, nbytes=nbytes)


class Recorder:
    """A cache whose _on_evict hook also records (task, sha, reason)."""

    def __init__(self, capacity: int, loader=None):
        self.metrics = Metrics()
        self.evicted: list[tuple[str, str, str]] = []
        self.cache = ResidualCache(capacity, loader or (lambda t, v, s: entry(t, s)), metrics=self.metrics)
        original = self.cache._on_evict

        def hook(e, reason):
            self.evicted.append((e.task, e.sha256, reason))
            original(e, reason)

        self.cache._on_evict = hook

    def value(self, name: str, **labels) -> float:
        v = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v


def test_lru_order_byte_bound_and_eviction_hook():
    r = Recorder(capacity=300)
    c = r.cache
    c.put(entry("A"))
    c.put(entry("B"))
    c.put(entry("C"))
    assert c.keys() == [("A", "s1"), ("B", "s1"), ("C", "s1")]
    assert c.bytes_used == 300 and r.value("uda_residual_cache_bytes") == 300
    assert r.value("uda_residual_cache_entries") == 3

    assert c.get(("A", "s1")) is not None  # A becomes most recently used
    assert c.keys() == [("B", "s1"), ("C", "s1"), ("A", "s1")]
    assert c.peek(("B", "s1")) is not None  # peek does not reorder
    assert c.keys() == [("B", "s1"), ("C", "s1"), ("A", "s1")]

    c.put(entry("D"))  # over budget: B, the least recently used, goes through the hook
    assert r.evicted == [("B", "s1", "lru")]
    assert c.keys() == [("C", "s1"), ("A", "s1"), ("D", "s1")]
    assert c.bytes_used == 300
    assert r.value("uda_residual_cache_evictions_total") == 1
    assert r.value("uda_task_resident", task="B") == 0
    assert r.value("uda_task_resident", task="D") == 1

    c.put(entry("E", nbytes=200))  # needs two evictions
    assert r.evicted[1:] == [("C", "s1", "lru"), ("A", "s1", "lru")]
    assert c.keys() == [("D", "s1"), ("E", "s1")]
    assert c.bytes_used == 300


def test_keys_are_task_and_sha():
    r = Recorder(capacity=1000)
    c = r.cache
    c.put(entry("A", "old"))
    c.put(entry("A", "new", version=2))
    assert c.keys() == [("A", "old"), ("A", "new")]
    c.put(entry("A", "new", version=2))  # repeated add is a refresh, not a second copy
    assert c.bytes_used == 200
    assert c.evict_task("A", keep_sha="new", reason="replaced") == 1
    assert r.evicted == [("A", "old", "replaced")]
    assert c.keys() == [("A", "new")]
    assert r.value("uda_task_resident", task="A") == 1  # the new version is still resident
    assert c.evict(("A", "new"), reason="unload")
    assert not c.evict(("A", "new"))
    assert r.value("uda_task_resident", task="A") == 0
    assert c.bytes_used == 0 and len(c) == 0


def test_pinned_tasks_are_never_evicted_and_a_full_cache_raises():
    r = Recorder(capacity=300)
    c = r.cache
    c.pin("P")
    c.put(entry("P", nbytes=200))
    c.put(entry("A"))
    c.put(entry("B"))  # P is the oldest, but pinned: A goes
    assert r.evicted == [("A", "s1", "lru")]
    assert c.keys() == [("P", "s1"), ("B", "s1")]
    with pytest.raises(CacheFull, match="pinned"):
        c.put(entry("X", nbytes=150))  # 200 pinned + 150 > 300 whatever is evicted
    assert c.keys() == [("P", "s1"), ("B", "s1")]  # nothing was evicted for a failed put
    c.unpin("P")
    c.put(entry("X", nbytes=150))
    assert r.evicted[-1] == ("P", "s1", "lru")
    assert c.keys() == [("B", "s1"), ("X", "s1")]


def test_load_async_shares_one_load_and_reports_failures():
    gate = threading.Event()
    calls = []

    def loader(task, version, sha):
        calls.append((task, version, sha))
        gate.wait(10)
        if task == "bad":
            raise ValueError("broken residual")
        return entry(task, sha, version=version)

    changes = []
    r = Recorder(capacity=1000, loader=loader)
    r.cache._on_change = lambda: changes.append(1)
    f1 = r.cache.load_async("A", 3, "s9")
    f2 = r.cache.load_async("A", 3, "s9")
    assert f1 is f2 and r.cache.is_loading(("A", "s9"))
    bad = r.cache.load_async("bad", 1, "s1")
    gate.set()
    assert f1.result(10).version == 3
    with pytest.raises(ValueError, match="broken"):
        bad.result(10)
    assert calls.count(("A", 3, "s9")) == 1
    assert r.cache.keys() == [("A", "s9")]
    assert not r.cache.is_loading(("A", "s9"))
    assert r.value("uda_residual_cache_misses_total") == 2
    assert len(changes) == 2  # the model thread is woken for success and failure alike
    done = r.cache.load_async("A", 3, "s9")  # resident: an already finished future
    assert done.done() and done.result().key == ("A", "s9")
    r.cache.close()


def test_a_new_version_of_a_pinned_task_replaces_its_old_one():
    r = Recorder(capacity=250)  # a budget sized to the pinned task: one version and a bit
    c = r.cache
    c.pin("P")
    c.put(entry("P", "v1", nbytes=100))
    c.put(entry("A", nbytes=100))
    c.put(entry("P", "v2", nbytes=100, version=2))  # the unpinned A goes first
    assert r.evicted == [("A", "s1", "lru")]
    c.put(entry("P", "v3", nbytes=200, version=3))  # then P's own older versions
    assert r.evicted[1:] == [("P", "v1", "replaced"), ("P", "v2", "replaced")]
    assert c.keys() == [("P", "v3")] and c.bytes_used == 200
    with pytest.raises(CacheFull, match="pinned"):  # another task's pins still never go
        c.put(entry("X", nbytes=100))
    assert c.keys() == [("P", "v3")]


def test_a_load_of_a_deleted_task_is_not_kept_unless_asked_for_again():
    gate = threading.Event()

    def loader(task, version, sha):
        gate.wait(10)
        return entry(task, sha, version=version)

    r = Recorder(capacity=1000, loader=loader)
    gone = r.cache.load_async("A", 1, "s1")
    back = r.cache.load_async("B", 1, "s2")
    r.cache.evict_task("A", reason="deleted", loading_too=True)
    r.cache.evict_task("B", reason="deleted", loading_too=True)
    again = r.cache.load_async("B", 1, "s2")  # B republished with the same bytes meanwhile
    assert again is back
    gate.set()
    assert gone.result(10).task == "A"  # whoever waited gets the entry...
    assert again.result(10).task == "B"
    assert r.cache.keys() == [("B", "s2")]  # ...but a deleted task's is not kept resident
    assert r.value("uda_task_resident", task="A") == 0.0
    r.cache.close()


def test_loads_that_never_run_because_the_cache_closed_fail_their_waiters():
    gate, started = threading.Event(), threading.Event()

    def loader(task, version, sha):
        started.set()
        gate.wait(10)
        return entry(task, sha, version=version)

    cache = ResidualCache(1000, loader, workers=1)
    running = cache.load_async("A", 1, "s1")
    assert started.wait(10)
    queued = cache.load_async("B", 1, "s2")
    cache.close(timeout=0.1)
    with pytest.raises(ShuttingDown):
        queued.result(10)
    assert not cache.is_loading(("B", "s2"))
    with pytest.raises(ShuttingDown):
        cache.load_async("C", 1, "s3").result(10)  # after close: an answer, not a dead future
    assert not cache.is_loading(("C", "s3"))
    gate.set()
    assert running.result(10).task == "A"
