"""The embedded default store: a local (or mounted) directory, safe across processes.

Layout, one folder per task:

    root/tasks/<task>/v00000007.safetensors   the blobs, one file per retained version
    root/tasks/<task>/index.json              {"current": 7, "last": 7, "versions": {"7": {...}}}
    root/tasks/<task>/.lock                   flock'ed by writers (publish, rollback, delete)

Readers never lock: every file is written to a temp file, fsync'ed and os.replace'd, so a
reader sees a whole old file or a whole new one. A publish writes the blob first and the index
second, so the index never names a missing blob; a publisher killed in between leaves an
orphan blob, which the next writer removes after numbering past it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from residual_store.atomic import TMP_PREFIX, atomic_write
from residual_store.errors import IntegrityError, ResidualStoreError, StoreUnavailable, UnknownTask
from residual_store.stores.base import (
    DEFAULT_KEEP,
    ResidualStore,
    StoreEvent,
    TaskInfo,
    VersionInfo,
    pick_version,
    validate_task_name,
    version_record,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2  # how often events() compares current_versions()
# list_tasks trusts a task's cached index while index.json keeps its inode, size and mtime, but
# only once the file was this much older than the read that cached it: a rewrite within one
# tick of a coarse (1-2 s, NFS/FAT) mtime could otherwise keep all three.
_STABLE_AFTER_S = 2.0
_BLOB_RE = re.compile(r"^v(\d{8,})\.safetensors$")


def _blob_name(version: int) -> str:
    return f"v{version:08d}.safetensors"


def _read_nofollow(path: Path) -> bytes:
    """Read a file, refusing a symlink planted in place of it (it could point outside root)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ResidualStoreError(f"refusing symlink {path}: store files must be "
                                     "regular files inside the store root") from e
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


class DirectoryStore(ResidualStore):
    """Versioned residuals in `root/tasks/<task>/`; writers serialise on a per-task flock."""

    def __init__(self, root: str | os.PathLike[str], keep: int = DEFAULT_KEEP):
        self._set_keep(keep)
        self.root = Path(root).expanduser().absolute()
        self.url = f"file://{self.root}"
        # task -> ((inode, size, mtime_ns) of index.json, parsed index). Servers list every task
        # several times a second; reading and parsing each index every time cost them a
        # noticeable share of a core (and of the GIL) with hundreds of tasks.
        self._listed: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r}, keep={self.keep})"

    # -- paths -------------------------------------------------------------------------------

    @property
    def _tasks_dir(self) -> Path:
        return self.root / "tasks"

    def _task_dir(self, task: str) -> Path:
        """The task's folder; the name is validated before the filesystem is touched."""
        validate_task_name(task)
        tasks = self._tasks_dir
        path = tasks / task
        for p in (tasks, path):
            if p.is_symlink():
                raise ResidualStoreError(f"refusing symlinked store directory {p}: "
                                         "replace it with a real directory inside the store root")
        if path.exists() and path.resolve().parent != tasks.resolve():
            raise ResidualStoreError(f"refusing {path}: it resolves outside {tasks}")
        return path

    @contextlib.contextmanager
    def _locked(self, task: str, create: bool) -> Iterator[Path]:
        """Hold the task's writer lock (across processes); create its folder when asked."""
        path = self._task_dir(task)
        if create:
            path.mkdir(parents=True, exist_ok=True)
            path = self._task_dir(task)  # re-check: a symlink may have been planted meanwhile
        elif not path.is_dir():
            raise UnknownTask(f"unknown task {task!r} in {self.url}")
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # closing releases the flock

    # -- index -------------------------------------------------------------------------------

    def _read_index(self, path: Path) -> dict[str, Any] | None:
        """The task's index, or None when there is none (never published, or the root is gone)."""
        try:
            raw = _read_nofollow(path / "index.json")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path / 'index.json'}: {e}") from e
        try:
            index = json.loads(raw)
            index["versions"] = {int(v): rec for v, rec in index["versions"].items()}
            return index
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"corrupt index {path / 'index.json'}: {e}") from e

    def _write_index(self, path: Path, index: dict[str, Any]) -> None:
        data = dict(index, versions={str(v): rec for v, rec in sorted(index["versions"].items())})
        atomic_write(path / "index.json", json.dumps(data, indent=1, sort_keys=True).encode())

    def _live_index(self, task: str) -> tuple[Path, dict[str, Any]]:
        """The folder and index of a task that has a current version, else UnknownTask."""
        path = self._task_dir(task)
        index = self._read_index(path)
        if not index or index.get("current") is None:
            raise UnknownTask(f"unknown task {task!r} in {self.url}")
        return path, index

    @staticmethod
    def _version_info(task: str, version: int, rec: dict[str, Any]) -> VersionInfo:
        try:
            return version_record(task, version, rec)
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"corrupt index entry for {task!r} v{version}: {e}") from e

    @staticmethod
    def _pick(task: str, index: dict[str, Any], version: int | None) -> int:
        return pick_version(task, index["current"], index["versions"], version)

    # -- reads -------------------------------------------------------------------------------

    def info(self, task: str, version: int | None = None) -> VersionInfo:
        _, index = self._live_index(task)
        v = self._pick(task, index, version)
        return self._version_info(task, v, index["versions"][v])

    def _blob_where(self, task: str, version: int) -> str:
        return str(self._task_dir(task) / _blob_name(version))

    def _read_blob(self, task: str, info: VersionInfo) -> bytes | None:
        path = self._task_dir(task) / _blob_name(info.version)
        try:
            return _read_nofollow(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot read {path}: {e}") from e

    def versions(self, task: str) -> list[VersionInfo]:
        _, index = self._live_index(task)
        return [self._version_info(task, v, rec) for v, rec in sorted(index["versions"].items())]

    def _task_names(self) -> list[str]:
        try:
            with os.scandir(self._tasks_dir) as entries:  # is_symlink() from the listing, no stat
                names = sorted(e.name for e in entries if not e.is_symlink())
        except FileNotFoundError:
            return []  # a store nobody published to yet has no tasks
        except OSError as e:
            raise StoreUnavailable(f"cannot list {self._tasks_dir}: {e}") from e
        ok = []
        for name in names:
            try:
                validate_task_name(name)
            except ResidualStoreError:
                continue  # temp files, editor droppings: not tasks
            ok.append(name)
        return ok

    def _listed_index(self, task: str) -> dict[str, Any] | None:
        """`_read_index` for list_tasks: re-read only when index.json changed since."""
        file = f"{self.root}/tasks/{task}/index.json"  # a str, not a Path: this is the hot loop
        try:
            st = os.stat(file, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"cannot read {file}: {e}") from e
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._listed.get(task)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        read_at = time.time()
        index = self._read_index(self._tasks_dir / task)  # refuses a symlink: none is cached
        if index is not None and st.st_mtime < read_at - _STABLE_AFTER_S:
            self._listed[task] = (stamp, index)
        else:
            self._listed.pop(task, None)
        return index

    def list_tasks(self) -> list[TaskInfo]:
        out = []
        names = self._task_names()
        for task in set(self._listed) - set(names):
            self._listed.pop(task, None)
        for task in names:
            try:
                index = self._listed_index(task)
                if not index or index.get("current") is None:
                    continue  # deleted, or never finished its first publish
                cur = index["current"]
                current = self._version_info(task, cur, index["versions"][cur])
            except (IntegrityError, KeyError, TypeError) as e:
                # One damaged task must not hide the others from servers; `verify` reports it.
                logger.warning("skipping task %r in %s: damaged index (%s)", task, self.url, e)
                continue
            out.append(TaskInfo(task=task, current=current,
                                versions=tuple(sorted(index["versions"]))))
        return out

    # -- writes ------------------------------------------------------------------------------

    def _publish(self, task: str, blob: bytes, metadata: dict[str, str]) -> VersionInfo:
        with self._locked(task, create=True) as path:
            index = self._read_index(path) or {"current": None, "last": 0, "versions": {}}
            if "rolled_back_from" in metadata and index.get("current") is None:
                # Deleted after rollback() read the old version: do not bring the task back.
                raise UnknownTask(f"task {task!r} was deleted from {self.url} during the rollback")
            on_disk = self._blob_versions(path)
            # Never reuse a number: count blobs a killed publisher left and deleted versions too.
            version = max([index.get("last", 0), *index["versions"], *on_disk]) + 1
            info = VersionInfo(task=task, version=version,
                               sha256=hashlib.sha256(blob).hexdigest(), size=len(blob),
                               created=time.time(), metadata=metadata)
            atomic_write(path / _blob_name(version), blob)  # blob first, index second
            index["versions"][version] = {"sha256": info.sha256, "size": info.size,
                                          "created": info.created, "metadata": metadata}
            for old in sorted(index["versions"])[:-self.keep]:
                del index["versions"][old]
            index.update(current=version, last=version)
            self._write_index(path, index)
            self._remove_unindexed(path, index)
        logger.info("published %s v%d (%d bytes) to %s", task, version, len(blob), self.url)
        return info

    def delete(self, task: str) -> None:
        with self._locked(task, create=False) as path:
            index = self._read_index(path)
            if not index or index.get("current") is None:
                raise UnknownTask(f"unknown task {task!r} in {self.url}")
            # Keep a tombstone index (and the lock file) so numbers are never reused and a
            # writer waiting on the lock does not end up in an unlinked folder.
            last = max([index.get("last", 0), *index["versions"]])
            tombstone = {"current": None, "last": last, "versions": {}}
            self._write_index(path, tombstone)
            self._remove_unindexed(path, tombstone)
        logger.info("deleted %s from %s", task, self.url)

    @staticmethod
    def _blob_versions(path: Path) -> list[int]:
        return [int(m.group(1)) for name in os.listdir(path) if (m := _BLOB_RE.match(name))]

    @staticmethod
    def _remove_unindexed(path: Path, index: dict[str, Any]) -> None:
        """Remove trimmed blobs, orphans of killed publishers and their temp files.

        Runs under the task lock, so no other writer has a file in flight here.
        """
        for name in os.listdir(path):
            m = _BLOB_RE.match(name)
            stale = (m and int(m.group(1)) not in index["versions"]) or name.startswith(TMP_PREFIX)
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    (path / name).unlink()

    # -- events, health ----------------------------------------------------------------------

    def events(self, stop: Any = None) -> Iterator[StoreEvent]:
        """Poll current_versions() every POLL_INTERVAL_S and yield the differences.

        The first snapshot is taken now, at the call, so changes made after events() returns
        are reported even if the caller starts iterating later.
        """
        return self._poll(self._snapshot(warned=[False]), stop)

    def _snapshot(self, warned: list[bool]) -> dict[str, tuple[int, str]] | None:
        try:
            snap = self.current_versions()
            warned[0] = False
            return snap
        except ResidualStoreError as e:
            if not warned[0]:  # warn once per outage, not every 0.2 s
                logger.warning("store %s unreadable, events paused: %s", self.url, e)
                warned[0] = True
            return None

    def _poll(self, old: dict[str, tuple[int, str]] | None, stop: Any) -> Iterator[StoreEvent]:
        warned = [False]
        while not (stop is not None and stop.is_set()):
            if stop is None:
                time.sleep(POLL_INTERVAL_S)
            elif stop.wait(POLL_INTERVAL_S):
                return
            new = self._snapshot(warned)
            if new is None:
                continue
            if old is not None:
                yield from self._diff(old, new)
            old = new

    def _diff(self, old: dict[str, tuple[int, str]],
              new: dict[str, tuple[int, str]]) -> Iterator[StoreEvent]:
        for task, (version, sha) in sorted(new.items()):
            if old.get(task) != (version, sha):
                yield StoreEvent(kind=self._kind_of(task, version), task=task,
                                 version=version, sha256=sha)
        for task in sorted(set(old) - set(new)):
            # A delete leaves its tombstone folder (delete()). A folder that is gone altogether
            # went with its volume or a move of tasks/ (a blip, an unmount, a wipe): no event,
            # so the server's reconcile decides, behind its store-reset guard.
            if os.path.isdir(f"{self.root}/tasks/{task}"):
                yield StoreEvent(kind="delete", task=task, version=None, sha256=None)

    def _kind_of(self, task: str, version: int) -> str:
        try:
            rolled = "rolled_back_from" in self.info(task, version).metadata
        except ResidualStoreError:
            rolled = False  # changed again meanwhile; the next poll reports the newer one
        return "rollback" if rolled else "publish"

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailable(f"store directory {self.root} does not exist or is not a "
                                   "directory: check the --store path and the volume mount")

    def check_writable(self) -> None:
        """The store directory, or the nearest folder above it that exists (a publish creates
        the rest), accepts new files."""
        existing = self.root
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise StoreUnavailable(f"store path {self.root} is inside {existing}, which is a file: "
                                   "pick a directory for the store")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreUnavailable(f"store directory {existing} is not writable by this user: "
                                   "fix its permissions or pick another store directory")
