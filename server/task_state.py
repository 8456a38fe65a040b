"""The transitions of one task's record, as pure functions: (record, event) -> (record, actions).

The catalog (server/catalog.py) holds one TaskRecord per task, reads the store, starts loads and
checks, and applies the actions these functions return; nothing here touches a thread, a lock,
the store or the cache, so every rule is tested on its own (tests/server/test_task_state.py).
"""
from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class TaskVersion:
    """The served version of a task, from the store's metadata (no blob read needed)."""

    task: str
    version: int
    sha256: str
    metadata: dict[str, str]

    @property
    def key(self) -> tuple[str, str]:
        return (self.task, self.sha256)

    @property
    def classes(self) -> list[str]:
        try:
            return list(json.loads(self.metadata.get("classes", "[]")))
        except (ValueError, TypeError, RecursionError):
            return []

    @property
    def dsp(self) -> int | None:
        try:
            return int(self.metadata["dsp"])
        except (KeyError, ValueError):
            return None


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A version the server would not serve, and why."""

    version: int
    sha256: str
    reason: str  # metrics label: base_mismatch, invalid_format, integrity, load_failed
    detail: str  # readable one-line explanation


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """What the server knows of one task."""

    served: TaskVersion | None = None
    staging: tuple[int, str] | None = None  # (version, sha256) loading or checked before a switch
    refusal: Refusal | None = None
    generation: int = 0  # deletes seen: a load or check begun in an older one has no effect


# -- actions -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stage:
    """Load (`check` False) or check the file of (`check` True) `candidate` before a switch."""

    candidate: TaskVersion
    check: bool


@dataclasses.dataclass(frozen=True)
class Switched:
    """`new` is served now, in place of `old` (None: a new task)."""

    old: TaskVersion | None
    new: TaskVersion


@dataclasses.dataclass(frozen=True)
class Superseded:
    """A staged version ended after a newer one switched: its cache entry is unused."""

    candidate: TaskVersion


@dataclasses.dataclass(frozen=True)
class Refused:
    """`candidate` was refused; `counted`: the loader counted it in the metrics already;
    `unpublished`: the task left service with it (it was the served version)."""

    candidate: TaskVersion
    refusal: Refusal
    counted: bool
    unpublished: bool = False


@dataclasses.dataclass(frozen=True)
class StageFailed:
    """Staging failed for a reason that is not the file's (a store blip): a later round retries."""

    candidate: TaskVersion
    detail: str


@dataclasses.dataclass(frozen=True)
class Removed:
    served: TaskVersion | None  # what was served when the delete came


Action = Stage | Switched | Superseded | Refused | StageFailed | Removed


# -- transitions ---------------------------------------------------------------------------------

def seen(rec: TaskRecord, version: int, sha256: str, reset: bool = False) -> tuple[TaskRecord, bool]:
    """The store's current (version, sha256) was seen: True when it is news worth a store read;
    the same bytes as served under a higher number only renumber the served version. `reset`:
    the store lost the served version and numbers from 1 again, so a lower version is news."""
    old = rec.served
    if old is not None and version <= old.version and not (reset and version != old.version):
        return rec, False  # old news (events and reconcile overlap)
    if old is not None and old.sha256 == sha256:
        # A rollback to what is served: nothing to load.
        return dataclasses.replace(rec, served=dataclasses.replace(old, version=version)), False
    refused = rec.refusal
    if refused is not None and (refused.version, refused.sha256) == (version, sha256):
        # Counted and logged once already. The sha too: a store reset numbers from 1 again,
        # and the file refused as v1 before it says nothing about the v1 of now.
        return rec, False
    if rec.staging == (version, sha256):
        return rec, False  # loading or checked already, after a store reset too
    staged = rec.staging
    return rec, not (staged is not None and staged[0] >= version and not reset)


def offered(rec: TaskRecord, candidate: TaskVersion, *, reset: bool, mismatch: str | None,
            warm: bool, pinned: bool, can_check: bool) -> tuple[TaskRecord, list[Action]]:
    """The store's metadata of `candidate` was read. `mismatch`: why its base is not ours (None
    when it is); `warm`: the served version is resident or the task pinned; `pinned`: the task
    is pinned; `can_check`: a served cold task's new file can be checked before the switch."""
    rec, news = seen(rec, candidate.version, candidate.sha256, reset)
    if not news:
        return rec, []
    if mismatch is not None:
        refusal = Refusal(candidate.version, candidate.sha256, "base_mismatch", mismatch)
        return dataclasses.replace(rec, refusal=refusal), [Refused(candidate, refusal, counted=False)]
    old = rec.served
    check = old is not None and not warm and can_check
    if (old is not None and warm) or check or (old is None and pinned):
        staged = dataclasses.replace(rec, staging=(candidate.version, candidate.sha256))
        return staged, [Stage(candidate, check=check)]
    return switch(rec, candidate, reset)


def switch(rec: TaskRecord, candidate: TaskVersion, reset: bool = False
           ) -> tuple[TaskRecord, list[Action]]:
    old = rec.served
    if old is not None and candidate.version <= old.version and not reset:
        # Superseded while it loaded (a newer version switched first): its entry would sit in
        # the cache unused, and forever for a pinned task.
        return rec, [Superseded(candidate)] if candidate.sha256 != old.sha256 else []
    return dataclasses.replace(rec, served=candidate, refusal=None), [Switched(old, candidate)]


def staged(rec: TaskRecord, candidate: TaskVersion, generation: int, *, cancelled: bool = False,
           refusal: Refusal | None = None, error: str | None = None, reset: bool = False
           ) -> tuple[TaskRecord, list[Action]]:
    """A load or check of `candidate`, begun in `generation`, ended: ok (no refusal, no
    error), refused (the file is bad), failed otherwise (`error`), or never ran (`cancelled`)."""
    if rec.staging == (candidate.version, candidate.sha256):
        rec = dataclasses.replace(rec, staging=None)
    if cancelled or generation != rec.generation:
        return rec, []  # the catalog stopped, or the task was deleted while it loaded
    if refusal is not None:
        # Recorded with the end of the staging, so the other follower (events vs reconcile)
        # cannot stage, count and log it a second time.
        return dataclasses.replace(rec, refusal=refusal), [Refused(candidate, refusal, counted=True)]
    if error is not None:
        return rec, [StageFailed(candidate, error)]
    return switch(rec, candidate, reset)


def load_refused(rec: TaskRecord, tv: TaskVersion, refusal: Refusal
                 ) -> tuple[TaskRecord, list[Action]]:
    """A load of the served `tv` found a bad file: the task leaves service with the refusal."""
    served = rec.served
    if served is None or served.sha256 != tv.sha256:
        return rec, []  # moved on meanwhile, or refused already (by the other model thread)
    refusal = dataclasses.replace(refusal, version=served.version, sha256=served.sha256)
    return (dataclasses.replace(rec, served=None, refusal=refusal),
            [Refused(served, refusal, counted=True, unpublished=True)])


def deleted(rec: TaskRecord) -> tuple[TaskRecord, list[Action]]:
    """The store confirmed a delete: everything begun before it ends without effect."""
    return TaskRecord(generation=rec.generation + 1), [Removed(rec.served)]
