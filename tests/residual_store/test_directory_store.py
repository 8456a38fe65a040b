"""What only the directory store has: files on disk, symlinks, a root that may not exist yet."""
from __future__ import annotations

import json
import logging
import os
import threading

import pytest

from residual_store.errors import IntegrityError, ResidualStoreError, StoreUnavailable, UnknownTask
from residual_store.stores.directory import DirectoryStore


def test_layout_on_disk(dir_store, blob_factory):
    for seed in range(2):
        dir_store.publish("Ar2Cl", blob_factory(seed=seed))
    folder = dir_store.root / "tasks" / "Ar2Cl"
    assert sorted(os.listdir(folder)) == [".lock", "index.json", "v00000001.safetensors",
                                          "v00000002.safetensors"]
    index = json.loads((folder / "index.json").read_text())
    assert index["current"] == 2 and sorted(index["versions"]) == ["1", "2"]
    assert (folder / "v00000002.safetensors").read_bytes() == blob_factory(seed=1)


def test_missing_root_reads_empty_and_publish_creates_it(tmp_path, blob_factory):
    store = DirectoryStore(tmp_path / "not" / "yet")
    assert store.list_tasks() == [] and store.current_versions() == {}
    with pytest.raises(UnknownTask):
        store.get("Ar2Cl")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.ping()
    assert not (tmp_path / "not").exists()  # reading created nothing
    store.publish("Ar2Cl", blob_factory())
    store.ping()


def test_ping_refuses_a_file_as_root(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable):
        DirectoryStore(tmp_path / "file").ping()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        DirectoryStore(tmp_path, keep=0)


def test_symlinked_task_dir_outside_root_refused(tmp_path, blob_factory):
    outside = DirectoryStore(tmp_path / "outside")
    outside.publish("Ar2Cl", blob_factory())
    store = DirectoryStore(tmp_path / "store")
    store.publish("Pr2Rw", blob_factory("Pr2Rw"))
    (store.root / "tasks" / "evil").symlink_to(outside.root / "tasks" / "Ar2Cl")
    before = sorted(os.listdir(outside.root / "tasks" / "Ar2Cl"))
    for call in (lambda: store.get("evil"), lambda: store.info("evil"),
                 lambda: store.versions("evil"), lambda: store.publish("evil", blob_factory()),
                 lambda: store.delete("evil"), lambda: store.rollback("evil", 1)):
        with pytest.raises(ResidualStoreError, match="symlink"):
            call()
    assert [t.task for t in store.list_tasks()] == ["Pr2Rw"]
    assert sorted(os.listdir(outside.root / "tasks" / "Ar2Cl")) == before


def test_symlinked_tasks_dir_refused(tmp_path, blob_factory):
    outside = DirectoryStore(tmp_path / "outside")
    outside.publish("Ar2Cl", blob_factory())
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "tasks").symlink_to(outside.root / "tasks")
    with pytest.raises(ResidualStoreError, match="symlink"):
        DirectoryStore(tmp_path / "store").publish("Ar2Cl", blob_factory(seed=1))
    assert outside.info("Ar2Cl").version == 1


def test_symlinked_blob_refused(dir_store, tmp_path, blob_factory):
    blob = blob_factory()
    dir_store.publish("Ar2Cl", blob)
    planted = tmp_path / "planted.safetensors"
    planted.write_bytes(blob)  # same bytes: only the symlink check can catch it
    path = dir_store.root / "tasks" / "Ar2Cl" / "v00000001.safetensors"
    path.unlink()
    path.symlink_to(planted)
    with pytest.raises(ResidualStoreError, match="symlink"):
        dir_store.get("Ar2Cl")


def test_damaged_index_hides_only_that_task(dir_store, blob_factory, caplog):
    dir_store.publish("Ar2Cl", blob_factory())
    dir_store.publish("Pr2Rw", blob_factory("Pr2Rw"))
    (dir_store.root / "tasks" / "Ar2Cl" / "index.json").write_text("{broken")
    with caplog.at_level(logging.WARNING):
        assert [t.task for t in dir_store.list_tasks()] == ["Pr2Rw"]
    assert "Ar2Cl" in caplog.text
    with pytest.raises(IntegrityError, match="index"):
        dir_store.get("Ar2Cl")


def test_stray_entries_are_not_tasks(dir_store, blob_factory):
    dir_store.publish("Ar2Cl", blob_factory())
    (dir_store.root / "tasks" / ".tmp-x").write_text("")
    (dir_store.root / "tasks" / "empty").mkdir()
    assert [t.task for t in dir_store.list_tasks()] == ["Ar2Cl"]


def test_next_publish_removes_orphans_and_temp_files(dir_store, blob_factory, backend):
    dir_store.publish("Ar2Cl", blob_factory())
    backend.half_publish(dir_store, "Ar2Cl", blob_factory(seed=1))
    dir_store.publish("Ar2Cl", blob_factory(seed=2))
    folder = dir_store.root / "tasks" / "Ar2Cl"
    assert sorted(os.listdir(folder)) == [".lock", "index.json", "v00000001.safetensors",
                                          "v00000003.safetensors"]


def test_concurrent_publishers_from_threads(dir_store, blob_factory):
    got: list[int] = []

    def publish_five(p: int) -> None:
        for i in range(5):
            got.append(dir_store.publish("Ar2Cl", blob_factory(seed=10 * p + i)).version)

    threads = [threading.Thread(target=publish_five, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 41))
    assert dir_store.info("Ar2Cl").version == 40
    assert len(list((dir_store.root / "tasks" / "Ar2Cl").glob("v*.safetensors"))) == 5


def _age(path, seconds: float = 10.0) -> int:
    """Backdate a file's mtime, as if written `seconds` ago; returns the new mtime_ns."""
    mtime_ns = os.stat(path).st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return mtime_ns


def _counting_reads(store, monkeypatch) -> list[str]:
    reads: list[str] = []
    read = store._read_index
    monkeypatch.setattr(store, "_read_index", lambda path: reads.append(path.name) or read(path))
    return reads


def test_listing_rereads_only_changed_indexes(dir_store, blob_factory, monkeypatch):
    """Servers list every task several times a second: unchanged indexes are not parsed again,
    and a publish (a new index.json file) is seen at once."""
    for task in ("Ar2Cl", "Pr2Rw"):
        dir_store.publish(task, blob_factory(task))
        _age(dir_store.root / "tasks" / task / "index.json")
    reads = _counting_reads(dir_store, monkeypatch)
    assert {t.task: t.current.version for t in dir_store.list_tasks()} == {"Ar2Cl": 1, "Pr2Rw": 1}
    assert sorted(reads) == ["Ar2Cl", "Pr2Rw"]
    dir_store.list_tasks()
    assert len(reads) == 2  # nothing changed: nothing re-read
    dir_store.publish("Ar2Cl", blob_factory("Ar2Cl", seed=1))
    reads.clear()  # the publish read the index under its lock
    assert dir_store.current_versions()["Ar2Cl"][0] == 2
    assert reads == ["Ar2Cl"]
    dir_store.delete("Pr2Rw")
    assert [t.task for t in dir_store.list_tasks()] == ["Ar2Cl"]


def test_an_index_fresh_when_read_is_never_trusted_from_the_cache(dir_store, blob_factory):
    """Coarse mtimes (NFS, FAT) can leave a rewrite with the same inode, size and mtime; an index
    read within two seconds of its mtime is therefore read again next time ("racy git")."""
    dir_store.publish("Ar2Cl", blob_factory())
    index_file = dir_store.root / "tasks" / "Ar2Cl" / "index.json"
    assert dir_store.current_versions()["Ar2Cl"][0] == 1
    before = os.stat(index_file)
    text = index_file.read_text()
    index = json.loads(text)
    index["versions"]["1"]["sha256"] = "f" * 64  # same length: same size, rewritten in place
    with open(index_file, "r+") as f:
        f.write(json.dumps(index, indent=1, sort_keys=True))
    os.utime(index_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(index_file)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                                before.st_mtime_ns)
    assert dir_store.current_versions()["Ar2Cl"][1] == "f" * 64
