"""The store interface: where residual blobs live, versioned, with change events.

A store keeps, per task, numbered versions of one residual blob (the safetensors bytes of a
uda-residual/1 file) and a pointer to the current one. Implementations: `directory.py`
(the embedded default) and `redis_store.py` (a fleet). `open_store(url)` in `__init__` picks one.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from residual_store.errors import IntegrityError, InvalidTaskName, UnknownTask

TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_KEEP = 5
_READ_RETRIES = 3  # a blob trimmed between reading the index and reading it: read again


def validate_task_name(task: object) -> str:
    """Return `task` if it is a legal task name, else raise InvalidTaskName naming the rule."""
    if not isinstance(task, str) or not TASK_NAME_RE.fullmatch(task) or task in (".", ".."):
        shown = repr(task)[:80]
        raise InvalidTaskName(
            f"invalid task name {shown}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit (e.g. 'Ar2Cl')"
        )
    return task


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """One stored version of a task's residual."""

    task: str
    version: int  # strictly increasing per task, starts at 1
    sha256: str  # hex digest of the blob's bytes, checked on every read
    size: int  # blob size in bytes
    created: float  # unix time of the publish
    metadata: dict[str, str]  # the safetensors header metadata of the blob


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A task and its current version."""

    task: str
    current: VersionInfo
    versions: tuple[int, ...]  # retained versions, ascending


@dataclasses.dataclass(frozen=True)
class StoreEvent:
    """A change notification; servers drop or refresh their cached copy of `task`."""

    kind: Literal["publish", "rollback", "delete"]
    task: str
    version: int | None  # the new current version (None after delete)
    sha256: str | None


class ResidualStore(abc.ABC):
    """Versioned residual blobs, one current version per task.

    Guarantees every implementation keeps (tests/residual_store/test_store_conformance.py):
    - publish is atomic: readers see the old or the new version, never a mix; a crash mid
      publish leaves the old one current;
    - versions strictly increase per task, also under concurrent publishers;
    - rollback makes an older retained version current again by publishing its bytes as a new
      version (so versions never go backwards for readers);
    - the last `keep` versions are retained;
    - every blob's sha256 is checked on read (IntegrityError when it differs);
    - blobs are validated as uda-residual/1 files on publish (ResidualFormatError otherwise).
    """

    url: str
    keep: int

    def _set_keep(self, keep: object) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (e.g. keep=5), got {keep!r}")
        self.keep = keep

    def get(self, task: str, version: int | None = None) -> tuple[VersionInfo, bytes]:
        """The blob of `version` (default: current), its sha256 checked. UnknownTask if absent."""
        attempt = 0
        while True:
            attempt += 1
            info = self.info(task, version)
            blob = self._read_blob(task, info)
            where = self._blob_where(task, info.version)
            if blob is None:
                if attempt < _READ_RETRIES:
                    continue  # trimmed by a concurrent publish: the fresh index tells
                raise IntegrityError(f"{where} is missing but indexed")
            if hashlib.sha256(blob).hexdigest() != info.sha256:
                raise IntegrityError(f"{where}: sha256 differs from the one published "
                                     f"({info.sha256[:12]}...); the blob was altered")
            return info, blob

    @abc.abstractmethod
    def _read_blob(self, task: str, info: VersionInfo) -> bytes | None:
        """The stored bytes of `info`'s version, None when they are gone (trimmed)."""

    @abc.abstractmethod
    def _blob_where(self, task: str, version: int) -> str:
        """Where the blob lives (a path, a key), for error messages."""

    def publish(self, task: str, blob: bytes) -> VersionInfo:
        """Store `blob` as the task's next version and make it current."""
        validate_task_name(task)
        # Imported at call time: the stores only need the format check when writing.
        from residual_store.residual import inspect_blob

        metadata = inspect_blob(blob)  # refuse an invalid blob before touching the store
        return self._publish(task, bytes(blob), _stamped(metadata, rolled_back_from=None))

    def rollback(self, task: str, version: int) -> VersionInfo:
        """Make retained `version` current again, as a new version with the same bytes."""
        info, blob = self.get(task, version)
        return self._publish(task, blob, _stamped(info.metadata, rolled_back_from=version))

    @abc.abstractmethod
    def _publish(self, task: str, blob: bytes, metadata: dict[str, str]) -> VersionInfo:
        """Write `blob` as a new version with `metadata` (already validated) and make it
        current, atomically; a rollback has metadata["rolled_back_from"]."""

    @abc.abstractmethod
    def info(self, task: str, version: int | None = None) -> VersionInfo:
        """Metadata of `version` (default: current) without reading the blob."""

    @abc.abstractmethod
    def versions(self, task: str) -> list[VersionInfo]: ...

    @abc.abstractmethod
    def list_tasks(self) -> list[TaskInfo]: ...

    def current_versions(self) -> dict[str, tuple[int, str]]:
        """task -> (current version, sha256): the cheap call a server reconciles with."""
        return {t.task: (t.current.version, t.current.sha256) for t in self.list_tasks()}

    @abc.abstractmethod
    def delete(self, task: str) -> None: ...

    @abc.abstractmethod
    def events(self, stop: Any = None) -> Iterator[StoreEvent]:
        """Yield change events until `stop` (a threading.Event) is set; may miss events,
        so followers also reconcile with current_versions() periodically."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""

    def check_writable(self) -> None:
        """Raise StoreUnavailable (or ResidualStoreError) when a publish could not write here;
        publishers call it before hours of training. Default: reachable is enough."""
        self.ping()

    def close(self) -> None:
        """Release connections."""


def _stamped(metadata: dict[str, str], rolled_back_from: int | None) -> dict[str, str]:
    """The blob's metadata as a version records it: where a rollback came from, if it is one."""
    metadata = dict(metadata)
    metadata.pop("rolled_back_from", None)
    if rolled_back_from is not None:
        metadata["rolled_back_from"] = str(rolled_back_from)
    return metadata


def version_record(task: str, version: int, rec: Mapping[str, Any]) -> VersionInfo:
    """A version as both stores record it ({sha256, size, created, metadata}); KeyError,
    TypeError or ValueError when the record is corrupt (the caller names where it was)."""
    return VersionInfo(task=task, version=version, sha256=rec["sha256"], size=int(rec["size"]),
                       created=float(rec["created"]), metadata=dict(rec["metadata"]))


def pick_version(task: str, current: int, versions: Mapping[int, Any], version: int | None) -> int:
    """`version` (default: `current`) if retained, else UnknownTask naming what is."""
    v = current if version is None else version
    if v not in versions:
        kept = ", ".join(str(n) for n in sorted(versions))
        raise UnknownTask(f"task {task!r} has no version {v} (retained: {kept})")
    return v
