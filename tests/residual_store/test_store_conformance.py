"""One suite, every backend: the guarantees ResidualStore documents, checked on the directory
store and on Redis (the `store` fixture is parametrized over both)."""
from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time

import pytest

from residual_store.errors import (
    IntegrityError,
    InvalidTaskName,
    ResidualFormatError,
    UnknownTask,
)
from residual_store.stores import StoreEvent, open_store

BAD_NAMES = ["../x", "%2e%2e", "a\x00b", "x" * 10_000, "tâche", "", ".", "..", "a/b", " a",
             "-lead", None, 7]


def test_publish_get_info(store, blob_factory):
    blob = blob_factory("Ar2Cl")
    info = store.publish("Ar2Cl", blob)
    assert (info.task, info.version, info.size) == ("Ar2Cl", 1, len(blob))
    assert info.sha256 == hashlib.sha256(blob).hexdigest()
    assert info.metadata["task"] == "Ar2Cl" and info.metadata["format"] == "uda-residual/1"
    got_info, got = store.get("Ar2Cl")
    assert got == blob and got_info == info
    assert store.info("Ar2Cl") == info == store.info("Ar2Cl", 1)
    assert store.get("Ar2Cl", 1)[1] == blob


def test_versions_increase_and_list(store, blob_factory):
    v = [store.publish("Ar2Cl", blob_factory("Ar2Cl", seed=i)).version for i in range(3)]
    assert v == [1, 2, 3]
    assert store.publish("Pr2Rw", blob_factory("Pr2Rw")).version == 1  # numbered per task
    assert [x.version for x in store.versions("Ar2Cl")] == [1, 2, 3]
    tasks = {t.task: t for t in store.list_tasks()}
    assert set(tasks) == {"Ar2Cl", "Pr2Rw"}
    assert tasks["Ar2Cl"].current.version == 3 and tasks["Ar2Cl"].versions == (1, 2, 3)
    cur = store.current_versions()
    assert cur == {"Ar2Cl": (3, store.info("Ar2Cl").sha256), "Pr2Rw": (1, store.info("Pr2Rw").sha256)}
    assert store.get("Ar2Cl", 2)[1] == blob_factory("Ar2Cl", seed=1)


def test_publish_under_another_name_keeps_metadata(store, blob_factory):
    info = store.publish("Ar2Cl-copy", blob_factory("Ar2Cl"))
    assert info.task == "Ar2Cl-copy" and info.metadata["task"] == "Ar2Cl"


def test_empty_store(store):
    assert store.list_tasks() == [] and store.current_versions() == {}
    for call in (lambda: store.get("Ar2Cl"), lambda: store.info("Ar2Cl"),
                 lambda: store.versions("Ar2Cl"), lambda: store.delete("Ar2Cl"),
                 lambda: store.rollback("Ar2Cl", 1)):
        with pytest.raises(UnknownTask, match="Ar2Cl"):
            call()


def test_unknown_version(store, blob_factory):
    store.publish("Ar2Cl", blob_factory())
    with pytest.raises(UnknownTask, match="no version 9"):
        store.get("Ar2Cl", 9)
    with pytest.raises(UnknownTask):
        store.info("Ar2Cl", 9)


def test_keep_retains_last_five(store, blob_factory):
    for i in range(7):
        store.publish("Ar2Cl", blob_factory(seed=i))
    assert [v.version for v in store.versions("Ar2Cl")] == [3, 4, 5, 6, 7]
    with pytest.raises(UnknownTask):
        store.get("Ar2Cl", 2)
    assert store.get("Ar2Cl", 3)[1] == blob_factory(seed=2)


def test_corruption_detected(store, blob_factory, backend):
    store.publish("Ar2Cl", blob_factory(seed=0))
    store.publish("Ar2Cl", blob_factory(seed=1))
    backend.corrupt(store, "Ar2Cl", 2)
    with pytest.raises(IntegrityError, match="sha256"):
        store.get("Ar2Cl")
    assert store.get("Ar2Cl", 1)[1] == blob_factory(seed=0)  # the others are unaffected


@pytest.mark.parametrize("bad", [b"", b"not a safetensors file", "wrong-format", "no-classes"])
def test_invalid_blob_refused(store, blob_factory, bad):
    good = store.publish("Ar2Cl", blob_factory())
    if bad == "wrong-format":
        bad = blob_factory(format="uda-residual/0")
    elif bad == "no-classes":
        bad = blob_factory(classes=())
    with pytest.raises(ResidualFormatError):
        store.publish("Ar2Cl", bad)
    assert store.info("Ar2Cl") == good
    assert store.publish("Ar2Cl", blob_factory(seed=1)).version == 2


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:12])
def test_invalid_task_names_refused_everywhere(store, blob_factory, backend, name):
    blob = blob_factory()
    calls = [lambda: store.publish(name, blob), lambda: store.get(name), lambda: store.info(name),
             lambda: store.versions(name), lambda: store.delete(name),
             lambda: store.rollback(name, 1)]
    for call in calls:
        with pytest.raises(InvalidTaskName, match="invalid task name"):
            call()
    assert backend.touched(store) == []  # refused before any file or key was written


def test_rollback_publishes_old_bytes_as_new_version(store, blob_factory):
    store.publish("Ar2Cl", blob_factory(seed=0))
    store.publish("Ar2Cl", blob_factory(seed=1))
    info = store.rollback("Ar2Cl", 1)
    assert info.version == 3 and info.metadata["rolled_back_from"] == "1"
    assert info.sha256 == store.info("Ar2Cl", 1).sha256
    assert store.get("Ar2Cl")[1] == blob_factory(seed=0)
    again = store.rollback("Ar2Cl", 3)  # rolling back to a rollback names the version used
    assert again.version == 4 and again.metadata["rolled_back_from"] == "3"
    with pytest.raises(UnknownTask):
        store.rollback("Ar2Cl", 42)


def test_a_rollback_racing_a_delete_does_not_bring_the_task_back(store, blob_factory):
    store.publish("Ar2Cl", blob_factory(seed=0))
    store.publish("Ar2Cl", blob_factory(seed=1))
    read = store.get

    def get_then_lose_the_race(task, version=None):
        got = read(task, version)
        store.delete(task)  # lands between rollback()'s read and its write
        return got

    store.get = get_then_lose_the_race
    with pytest.raises(UnknownTask, match="deleted"):
        store.rollback("Ar2Cl", 1)
    store.get = read
    assert "Ar2Cl" not in store.current_versions()
    with pytest.raises(UnknownTask):
        store.info("Ar2Cl")
    assert store.publish("Ar2Cl", blob_factory(seed=2)).version > 2  # a plain publish still may


def test_delete_then_republish_never_reuses_numbers(store, blob_factory):
    store.publish("Ar2Cl", blob_factory(seed=0))
    store.publish("Ar2Cl", blob_factory(seed=1))
    store.publish("Pr2Rw", blob_factory("Pr2Rw"))
    store.delete("Ar2Cl")
    assert [t.task for t in store.list_tasks()] == ["Pr2Rw"]
    assert "Ar2Cl" not in store.current_versions()
    with pytest.raises(UnknownTask):
        store.get("Ar2Cl")
    with pytest.raises(UnknownTask):
        store.delete("Ar2Cl")
    # A server that cached Ar2Cl v2 must not mistake a new publish for what it has.
    assert store.publish("Ar2Cl", blob_factory(seed=2)).version == 3


def test_killed_publisher_leaves_old_version_current(store, blob_factory, backend):
    old = store.publish("Ar2Cl", blob_factory(seed=0))
    backend.half_publish(store, "Ar2Cl", blob_factory(seed=1))
    assert store.info("Ar2Cl") == old
    assert store.get("Ar2Cl")[1] == blob_factory(seed=0)
    assert [v.version for v in store.versions("Ar2Cl")] == [1]
    new = store.publish("Ar2Cl", blob_factory(seed=2))
    assert new.version == 3  # past the number the killed publisher had taken
    assert store.get("Ar2Cl")[1] == blob_factory(seed=2)
    assert [v.version for v in store.versions("Ar2Cl")] == [1, 3]


def _collect(it, out: list[StoreEvent]) -> None:
    for event in it:
        out.append(event)


def _wait_for(events: list[StoreEvent], pred, timeout: float = 10.0) -> StoreEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events:
            if pred(e):
                return e
        time.sleep(0.02)
    raise AssertionError(f"no matching event within {timeout}s; got {events}")


def test_events_for_publish_rollback_delete(store, blob_factory):
    stop = threading.Event()
    events: list[StoreEvent] = []
    thread = threading.Thread(target=_collect, args=(store.events(stop), events), daemon=True)
    thread.start()
    try:
        v1 = store.publish("Ar2Cl", blob_factory(seed=0))
        e = _wait_for(events, lambda e: e.version == 1)
        assert e == StoreEvent("publish", "Ar2Cl", 1, v1.sha256)
        store.publish("Ar2Cl", blob_factory(seed=1))
        _wait_for(events, lambda e: e.version == 2 and e.kind == "publish")
        v3 = store.rollback("Ar2Cl", 1)
        e = _wait_for(events, lambda e: e.version == 3)
        assert e == StoreEvent("rollback", "Ar2Cl", 3, v3.sha256) and v3.sha256 == v1.sha256
        store.delete("Ar2Cl")
        assert _wait_for(events, lambda e: e.kind == "delete") == StoreEvent("delete", "Ar2Cl", None, None)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive(), "events() did not stop when asked"


def _publisher(url: str, kw: dict, blobs: list[bytes], go, results) -> None:
    """Runs in a spawned process: wait for the start signal, publish, report the versions."""
    store = open_store(url, **kw)
    go.wait(60)
    results.put([store.publish("Ar2Cl", b).version for b in blobs])
    store.close()


@pytest.mark.slow
def test_concurrent_publishers_from_processes(store, blob_factory, backend):
    ctx = multiprocessing.get_context("spawn")
    url, kw = backend.spec(store)
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_publisher,
                         args=(url, kw, [blob_factory(seed=10 * p + i) for i in range(5)], go, results))
             for p in range(4)]
    for p in procs:
        p.start()
    go.set()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    versions = sorted(v for vs in got for v in vs)
    assert versions == list(range(1, 21))  # all distinct, none lost
    for vs in got:
        assert vs == sorted(vs)  # each publisher saw its own versions increase
    assert store.info("Ar2Cl").version == 20
    assert [v.version for v in store.versions("Ar2Cl")] == [16, 17, 18, 19, 20]
    for v in store.versions("Ar2Cl"):
        store.get("Ar2Cl", v.version)  # every retained blob is there and intact
