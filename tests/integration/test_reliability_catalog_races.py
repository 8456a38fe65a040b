"""Races inside the catalog: its two followers (store events and the periodic reconcile) on
one change, and the loads of two new versions of one task.

The server's own parts (real directory store, engine, loader, cache, catalog) are driven step by
step from the test; a store read or a residual check of the follower under test is held open
(rs.Held: the real call, run once the test releases it), so the racing order happens every
time.
"""
from __future__ import annotations

import logging
import shutil
import threading

import pytest
import reliability_support as rs

from residual_store import BaseSpec
from residual_store.stores import open_store
from server.cache import ResidualCache
from server.catalog import Catalog
from server.engine import SwapEngine
from server.loader import ResidualLoader
from server.metrics import Metrics

pytestmark = pytest.mark.integration


def parts(tmp_path):
    """A directory store and the server parts the catalog works with, nothing started."""
    store = open_store(str(tmp_path / "store"))
    engine = SwapEngine(BaseSpec(rs.MODEL), "cpu")
    engine.setup()
    metrics = Metrics()
    loader = ResidualLoader(store, engine, metrics)
    return store, engine, metrics, loader, ResidualCache(1 << 30, loader, metrics=metrics)


def a_check_of_v2_held_then_deleted(tmp_path):
    """A v1 served, A v2 published: A is cold, so v2's file is checked first; the check has
    read a good file and is held open while A is deleted (the store and the delete event).
    Returns the store, the catalog, the held check and v2's store record."""
    store, engine, metrics, loader, cache = parts(tmp_path)
    store.publish("A", rs.make_version("A", 1).blob)
    verify = rs.Held(loader.verify, "A", 2, after=True)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=verify)
    catalog.reconcile()
    v2 = store.publish("A", rs.make_version("A", 2).blob)
    catalog.consider("A", v2.version, v2.sha256)
    assert verify.arrived.wait(60)
    store.delete("A")
    catalog._confirmed_remove("A")  # what the delete event does
    return store, catalog, verify, v2


def test_reconcile_keeps_what_the_event_follower_added_while_it_ran(tmp_path, monkeypatch):
    store, engine, metrics, loader, cache = parts(tmp_path)
    for task, seed in (("A", 1), ("C", 2)):
        store.publish(task, rs.make_version(task, seed).blob)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=loader.verify)
    catalog.reconcile()
    assert {t: tv.version for t, tv in catalog.tasks().items()} == {"A": 1, "C": 1}  # known, cold

    store.publish("A", rs.make_version("A", 3).blob)
    store.delete("C")
    listing = rs.Held(store.list_tasks, after=True)  # the reconcile has its listing, then waits
    monkeypatch.setattr(store, "list_tasks", listing)
    reconcile = threading.Thread(target=catalog.reconcile)
    reconcile.start()  # lists A v2 and no C, then waits
    try:
        assert listing.arrived.wait(60)
        # What the event follower does meanwhile: a new task B, and C published again.
        for task, seed in (("B", 4), ("C", 5)):
            info = store.publish(task, rs.make_version(task, seed).blob)
            catalog.consider(task, info.version, info.sha256)
        rs.wait_for("B served, and C's new version checked and served", lambda: {
            t: tv.version for t, tv in catalog.tasks().items()} == {"A": 1, "B": 1, "C": 2})
    finally:
        listing.release.set()
        reconcile.join(60)
    rs.wait_for("A v2 checked and served", lambda: catalog.get("A").version == 2)
    assert {t: tv.version for t, tv in catalog.tasks().items()} == {"A": 2, "B": 1, "C": 2}
    catalog.stop()
    store.close()


def test_a_slow_check_of_one_new_version_holds_no_other_change_back(tmp_path):
    """A new version of a served but cold task is fetched and checked before it is served; a
    store slow on that one file must not stall the follower (and every other publish or
    delete behind it) until the file arrives."""
    store, engine, metrics, loader, cache = parts(tmp_path)
    for task, seed in (("A", 1), ("B", 2)):
        store.publish(task, rs.make_version(task, seed).blob)
    verify = rs.Held(loader.verify, "A", 2)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=verify)
    catalog.reconcile()
    store.publish("A", rs.make_version("A", 3).blob)
    store.publish("C", rs.make_version("C", 4).blob)
    store.delete("B")
    reconcile = threading.Thread(target=catalog.reconcile)
    try:
        reconcile.start()
        assert verify.arrived.wait(60)
        reconcile.join(30)  # bounds a hang only
        assert not reconcile.is_alive(), "the reconcile round waits for A's file"
        assert {t: tv.version for t, tv in catalog.tasks().items()} == {"A": 1, "C": 1}
    finally:
        verify.release.set()
        reconcile.join(60)
    rs.wait_for("A v2 checked and served", lambda: catalog.get("A").version == 2)
    catalog.stop()
    store.close()


def test_a_bad_version_both_followers_see_is_refused_once(tmp_path, monkeypatch, caplog):
    store, engine, metrics, loader, cache = parts(tmp_path)
    store.publish("T", rs.make_version("T", 1).blob)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=loader.verify)
    catalog.reconcile()
    info = store.publish("T", rs.make_version("T", 2, base_fingerprint="0" * 64).blob)
    read = rs.Held(store.info, "T", info.version)
    monkeypatch.setattr(store, "info", read)

    # The event follower has only the event: it reads the version's metadata (held open) ...
    event = threading.Thread(target=catalog.consider, args=("T", info.version, info.sha256))
    with caplog.at_level(logging.ERROR, logger="server.catalog"):
        event.start()
        try:
            assert read.arrived.wait(60)
            # ... while the reconcile, which has the metadata from its listing, refuses it.
            catalog.consider("T", info.version, info.sha256, info=info)
        finally:
            read.release.set()
            event.join(60)
    assert catalog.refusals()["T"].reason == "base_mismatch" and catalog.get("T").version == 1
    refused = metrics.registry.get_sample_value("uda_residuals_refused_total", {"reason": "base_mismatch"})
    logged = [r for r in caplog.records if r.getMessage().startswith(f"refused T v{info.version}")]
    assert (refused, len(logged)) == (1, 1)
    store.close()


def test_a_version_superseded_while_it_loaded_leaves_the_cache(tmp_path):
    """A pinned task: v2 loads slowly (held open), v3 loads and is switched to first; v2's
    entry must not stay resident, pinned by the task's name, when its load ends."""
    store, engine, metrics, loader, _ = parts(tmp_path)
    store.publish("P", rs.make_version("P", 1).blob)
    load = rs.Held(loader, "P", 2)
    loads_ended = threading.Semaphore(0)
    cache = ResidualCache(1 << 30, load, metrics=metrics, on_change=loads_ended.release)
    cache.pin("P")
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=loader.verify)
    catalog.reconcile()  # a pinned new task: loaded, then switched to
    assert loads_ended.acquire(timeout=60)
    v2, v3 = (store.publish("P", rs.make_version("P", seed).blob) for seed in (2, 3))
    try:
        catalog.consider("P", v2.version, v2.sha256)  # held open in the loader
        assert load.arrived.wait(60)
        catalog.consider("P", v3.version, v3.sha256)
        assert loads_ended.acquire(timeout=60)
        assert catalog.get("P").version == v3.version
    finally:
        load.release.set()
    assert loads_ended.acquire(timeout=60)  # v2 loaded, then found superseded
    assert catalog.get("P").version == v3.version
    assert cache.keys() == [("P", v3.sha256)]
    cache.close()
    store.close()


def test_a_task_deleted_while_its_new_version_is_checked_stays_deleted(tmp_path):
    """The event follower, in order: A v2 published (A is cold: its file is checked, held open),
    then A deleted. The check ending after the delete must not bring A back."""
    store, catalog, verify, _ = a_check_of_v2_held_then_deleted(tmp_path)
    verify.release.set()
    catalog.stop()  # waits for the check and what it does when it ends
    assert catalog.tasks() == {}
    store.close()


def test_after_a_store_reset_a_check_in_flight_is_not_started_again_every_round(tmp_path):
    """The store restarted empty and A was republished (v1 again, another file); while its
    check is slow, every reconcile round sees the same (version, sha256): one check, not one
    per round (each a blob read, and for a bad file a refusal counted again)."""
    store, engine, metrics, loader, cache = parts(tmp_path)
    store.publish("A", rs.make_version("A", 1).blob)
    store.publish("A", rs.make_version("A", 2).blob)
    checks = []
    verify = rs.Held(loader.verify, "A", 1)

    def counted(task, version, sha256):
        checks.append((task, version))
        verify(task, version, sha256)

    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=counted)
    catalog.reconcile()
    assert catalog.get("A").version == 2  # known, cold
    shutil.rmtree(tmp_path / "store")
    new = rs.make_version("A", 7)
    assert store.publish("A", new.blob).version == 1
    try:
        catalog.reconcile()
        assert verify.arrived.wait(60)
        for _ in range(3):
            catalog.reconcile()
        assert checks == [("A", 1)]
    finally:
        verify.release.set()
    rs.wait_for("the new v1 served", lambda: catalog.get("A").sha256 == store.info("A").sha256)
    catalog.stop()
    store.close()


@pytest.mark.parametrize("others", [(), ("B",)])
def test_a_delete_after_the_reconcile_listed_the_store_is_not_undone(tmp_path, monkeypatch, others):
    """The reconcile lists A; the delete event removes A; the reconcile then goes on with its
    listing. A must stay deleted, and (when A was the only task) the next round must not take
    the empty store for a wiped one that A is served from."""
    store, engine, metrics, loader, cache = parts(tmp_path)
    for seed, task in enumerate(("A", *others)):
        store.publish(task, rs.make_version(task, 60 + seed).blob)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=loader.verify)
    info = store.info("A")
    listing = rs.Held(store.list_tasks, after=True)
    monkeypatch.setattr(store, "list_tasks", listing)
    reconcile = threading.Thread(target=catalog.reconcile)
    reconcile.start()
    try:
        assert listing.arrived.wait(60)
        store.delete("A")
        catalog.consider("A", info.version, info.sha256)  # the publish event, first served here
        catalog._confirmed_remove("A")  # then the delete event
    finally:
        listing.release.set()
        reconcile.join(60)
    assert "A" not in catalog.tasks()
    monkeypatch.setattr(store, "list_tasks", listing.call)
    assert catalog.reconcile()
    assert set(catalog.tasks()) == set(others) and catalog.store_warning is None
    catalog.stop()
    store.close()


def test_a_residual_loading_when_its_task_is_deleted_is_not_kept(tmp_path):
    """A request's load of A (the model thread's, not the catalog's) is in flight when A is
    deleted: the entry must not become resident for a task nobody can ask for."""
    store, engine, metrics, loader, _ = parts(tmp_path)
    store.publish("A", rs.make_version("A", 1).blob)
    load = rs.Held(loader, "A", after=True)  # read and parsed, then held
    cache = ResidualCache(1 << 30, load, metrics=metrics)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=loader.verify)
    catalog.reconcile()
    served = catalog.get("A")
    future = cache.load_async("A", served.version, served.sha256)
    assert load.arrived.wait(60)
    store.delete("A")
    catalog._confirmed_remove("A")
    load.release.set()
    assert future.result(60).task == "A"
    assert cache.keys() == [] and cache.bytes_used == 0
    catalog.stop()
    cache.close()
    store.close()


def test_every_record_change_is_applied_on_the_control_thread(tmp_path, monkeypatch):
    """Whichever thread learns something (a follower, a model thread, a load or a check ending
    on a pool thread, the test's own thread), the records change on the catalog's control
    thread alone: the others only post what they learnt."""
    writers = []
    put = Catalog._put

    def spied_put(self, task, rec):  # the one writer of the records, spied on, still run
        writers.append((threading.current_thread().name, task))
        put(self, task, rec)

    monkeypatch.setattr(Catalog, "_put", spied_put)
    store, engine, metrics, loader, cache = parts(tmp_path)
    cache.pin("P")
    for task, seed in (("A", 1), ("B", 2), ("P", 3)):
        store.publish(task, rs.make_version(task, seed).blob)
    catalog = Catalog(store, cache, engine.fingerprint, metrics, verify=loader.verify)
    catalog.reconcile()  # A and B switched at once; P (pinned) loaded on the cache's thread first
    rs.wait_for("P loaded and served", lambda: catalog.get("P") is not None)

    info = store.publish("A", rs.make_version("A", 4).blob)  # A is cold: checked first
    on_thread(catalog.consider, "A", info.version, info.sha256, name="follower")
    rs.wait_for("A v2 checked and served", lambda: catalog.get("A").version == info.version)

    # B's file goes bad on disk; a model thread's load finds it and takes B out of service.
    served = catalog.get("B")
    for blob in (tmp_path / "store").rglob(f"B/v*{served.version}.safetensors"):
        blob.write_bytes(b"not the published bytes")
    with pytest.raises(Exception) as bad:
        loader("B", served.version, served.sha256)
    on_thread(catalog.refuse_loaded, served, bad.value, name="model")
    assert catalog.get("B") is None and catalog.refusals()["B"].version == served.version

    store.delete("A")
    on_thread(catalog._confirmed_remove, "A", name="events")  # what the delete event does
    assert set(catalog.tasks()) == {"P"}
    catalog.stop()
    assert {task for _, task in writers} == {"A", "B", "P"}
    assert {name for name, _ in writers} == {"uda-catalog"}
    cache.close()
    store.close()


def on_thread(call, *args, name: str) -> None:
    """`call(*args)` on a thread of its own, as a follower or a model thread would make it."""
    thread = threading.Thread(target=call, args=args, name=name)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()


def test_a_check_from_before_a_delete_changes_nothing_when_it_ends(tmp_path):
    """A v2's check (held open) begins; A is deleted, the store wiped and A published again (v1
    once more, other bytes), served at once as a new task. The old check's result then arrives
    at the control thread tagged with the generation before the delete: it must be dropped, not
    switch A back to the deleted v2 (a higher number than the v1 of now)."""
    store, catalog, verify, old = a_check_of_v2_held_then_deleted(tmp_path)
    shutil.rmtree(tmp_path / "store")
    new = store.publish("A", rs.make_version("A", 3).blob)
    assert new.version < old.version
    catalog.consider("A", new.version, new.sha256)
    assert catalog.get("A").sha256 == new.sha256
    verify.release.set()
    catalog.stop()  # waits for the check and for the control thread to apply its result
    assert catalog.get("A").sha256 == new.sha256 and "A" not in catalog.refusals()
    store.close()
