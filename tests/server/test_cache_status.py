"""ResidualCache.status: the one answer the model threads read (resident / loading / failed /
absent), and the failures of watched loads kept until they were told."""
from __future__ import annotations

import threading

import pytest

from server.cache import LoadState, ResidualCache
from server.errors import CacheFull, ShuttingDown
from tests.server.test_cache import entry


class Scripted:
    """A loader whose loads wait for `release`; tasks named bad* fail."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, task, version, sha):
        self.calls.append((task, version, sha))
        self.started.set()
        assert self.release.wait(10)
        if task.startswith("bad"):
            raise ValueError(f"broken residual {task}")
        return entry(task, sha, version=version)


@pytest.fixture
def scripted():
    loader = Scripted()
    cache = ResidualCache(1000, loader)
    yield cache, loader
    loader.release.set()
    cache.close()


def test_absent_then_loading_then_resident(scripted):
    cache, loader = scripted
    key = ("A", "s1")
    assert cache.status(key).state is LoadState.ABSENT
    future = cache.load_async("A", 1, "s1", watch=True)
    assert cache.status(key).state is LoadState.LOADING
    assert cache.watched_loads() == {key: future}
    loader.release.set()
    future.result(10)
    status = cache.status(key)
    assert status.state is LoadState.RESIDENT and status.entry.key == key
    assert cache.watched_loads() == {}


def test_a_watched_failure_stays_until_it_is_told_and_a_new_load_clears_it(scripted):
    cache, loader = scripted
    key = ("bad", "s1")
    future = cache.load_async("bad", 1, "s1", watch=True)
    loader.release.set()
    with pytest.raises(ValueError):
        future.result(10)
    status = cache.status(key)
    assert status.state is LoadState.FAILED and "broken residual bad" in str(status.error)
    assert cache.watched_loads() == {key: future}  # the same failed load, not a new one
    assert cache.status(key).state is LoadState.FAILED  # asking again does not reload
    assert len(loader.calls) == 1

    cache.forget_failure(key)
    assert cache.status(key).state is LoadState.ABSENT

    again = cache.load_async("bad", 1, "s1", watch=True)
    with pytest.raises(ValueError):
        again.result(10)
    assert cache.status(key).state is LoadState.FAILED
    retry = cache.load_async("bad", 1, "s1")  # loading again replaces the remembered failure
    assert cache.status(key).state is LoadState.LOADING
    with pytest.raises(ValueError):
        retry.result(10)
    assert cache.status(key).state is LoadState.ABSENT  # watching is per load: nobody watched this one


def test_an_unwatched_failure_leaves_the_key_absent(scripted):
    cache, loader = scripted
    future = cache.load_async("bad", 1, "s1")  # the catalog's staging, the admin load
    loader.release.set()
    with pytest.raises(ValueError):
        future.result(10)
    assert cache.status(("bad", "s1")).state is LoadState.ABSENT


def test_watching_a_load_in_flight_remembers_its_failure(scripted):
    cache, loader = scripted
    future = cache.load_async("bad", 1, "s1")  # begun by someone else
    assert cache.status(("bad", "s1"), watch=True).state is LoadState.LOADING
    loader.release.set()
    with pytest.raises(ValueError):
        future.result(10)
    assert cache.status(("bad", "s1")).state is LoadState.FAILED


def test_forget_failures_keeps_only_what_the_predicate_keeps(scripted):
    cache, loader = scripted
    loader.release.set()
    for task in ("bad1", "bad2"):
        with pytest.raises(ValueError):
            cache.load_async(task, 1, "s1", watch=True).result(10)
    cache.forget_failures(lambda key: key[0] == "bad2")
    assert cache.status(("bad1", "s1")).state is LoadState.ABSENT
    assert cache.status(("bad2", "s1")).state is LoadState.FAILED
    cache.forget_failures()
    assert cache.status(("bad2", "s1")).state is LoadState.ABSENT


def test_a_load_that_never_runs_is_a_failure_when_watched():
    loader = Scripted()
    cache = ResidualCache(1000, loader, workers=1)
    running = cache.load_async("A", 1, "s1")
    assert loader.started.wait(10)
    queued = cache.load_async("B", 1, "s2", watch=True)
    cache.close(timeout=0.1)
    with pytest.raises(ShuttingDown):
        queued.result(10)
    status = cache.status(("B", "s2"))
    assert status.state is LoadState.FAILED and isinstance(status.error, ShuttingDown)
    loader.release.set()
    assert running.result(10).task == "A"


def test_a_residual_larger_than_the_budget_is_failed_at_once_without_a_new_load():
    calls = []

    def loader(task, version, sha):
        calls.append(task)
        return entry(task, sha, nbytes=2000, version=version)

    cache = ResidualCache(1000, loader)
    key = ("big", "s1")
    with pytest.raises(CacheFull):
        cache.load_async("big", 1, "s1", watch=True).result(10)
    assert cache.status(key).state is LoadState.FAILED
    cache.forget_failure(key)
    asked_again = cache.load_async("big", 1, "s1", watch=True)
    assert asked_again.done() and calls == ["big"]  # no second read and parse
    status = cache.status(key)
    assert status.state is LoadState.FAILED and isinstance(status.error, CacheFull)
    cache.close()
