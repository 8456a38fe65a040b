"""Which tasks exist and which version of each is served, kept in step with the store.

Two followers feed `consider`: store events (fast, may miss some) and a periodic reconcile with
`store.list_tasks()` (cheap, catches what events missed), so a publish or rollback is
served within about reconcile_interval seconds. A new version whose metadata names another base
fingerprint is refused at once; for a task resident (or pinned) the new version is loaded in the
background first and served only once it loaded, and for a task served but not resident the new
file is fetched and validated first (on the catalog's own threads, so a slow store holding one
file back stalls neither follower), so a residual refused at load time also leaves the old
version serving. The served version only moves forward (store versions increase).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from types import MappingProxyType

from residual_store.errors import ResidualStoreError, UnknownTask
from residual_store.residual import base_mismatch_detail
from residual_store.stores import validate_task_name
from server.control_thread import ControlThread
from server.daemon_pool import DaemonPool
from server.errors import TaskUnavailable
from server.loader import refusal_reason
from server.task_state import (
    Action,
    Refusal,
    Refused,
    Removed,
    Stage,
    StageFailed,
    Superseded,
    Switched,
    TaskRecord,
    TaskVersion,
    deleted,
    load_refused,
    offered,
    seen,
    staged,
)

logger = logging.getLogger(__name__)

_VERIFY_WORKERS = 2  # concurrent checks of new versions of cold tasks (each reads one file)


__all__ = ["Catalog", "Refusal", "TaskVersion"]


# -- messages to the control thread ----------------------------------------------------------------
# Each carries what its sender learnt on its own thread (a store read, a load's outcome); the
# control thread applies it to the task's record as it is then.

@dataclasses.dataclass(frozen=True)
class _Seen:
    """The store's current (version, sha256) of `task` renumbers the served version (the same
    bytes under a higher number): no store read needed. `deletions` as in _Offered."""

    task: str
    version: int
    sha256: str
    reset: bool
    deletions: int | None


@dataclasses.dataclass(frozen=True)
class _Offered:
    """The store's metadata of `candidate` was read by a sender that had seen `deletions`
    deletes of the task (a delete since makes it stale); `mismatch`: why its base is not ours."""

    candidate: TaskVersion
    reset: bool
    mismatch: str | None
    deletions: int


@dataclasses.dataclass(frozen=True)
class _Staged:
    """A load or check of `candidate`, begun in `generation`, ended (see task_state.staged)."""

    candidate: TaskVersion
    generation: int
    cancelled: bool
    refusal: Refusal | None
    error: str | None
    reset: bool


@dataclasses.dataclass(frozen=True)
class _LoadRefused:
    """A load of the served `tv` found a bad file."""

    tv: TaskVersion
    refusal: Refusal


@dataclasses.dataclass(frozen=True)
class _Deleted:
    """The store confirmed that `task` was deleted."""

    task: str


class Catalog:
    """The served version of every published task; thread-safe.

    One control thread (`uda-catalog`) owns the task records: it alone applies the transitions
    of server/task_state.py and their actions (cache evictions, logs, metrics, starting loads
    and checks). The followers, the model threads and the admin calls read the store on their
    own threads (a slow store stalls no other task) and post what they learnt as a message;
    everyone reads the immutable snapshots the control thread publishes after each change.
    """

    def __init__(self, store, cache, fingerprint: str, metrics=None,
                 reconcile_interval: float = 1.0, on_change=None, verify=None,
                 activation: str | None = None):
        self.store = store
        # (task, version, sha256) -> None or a refusal: checks a new version of a task that is
        # not resident before it replaces the served one (ResidualLoader.verify).
        self._verify = verify
        self._verifier = DaemonPool(_VERIFY_WORKERS, "uda-verify") if verify is not None else None
        self.cache = cache
        self.fingerprint = fingerprint
        self.activation = activation  # the served base's, named in a base_mismatch refusal
        self.metrics = metrics
        self.reconcile_interval = reconcile_interval
        self._on_change = on_change or (lambda: None)
        # One record per task seen (served version, staging, refusal, generation), changed only
        # through the transitions of server/task_state.py, on the control thread only. Both maps
        # are replaced (never changed) by it after each change, so any thread reads them without
        # a lock: the records let a follower skip a store read for old news, and model threads
        # and request handlers read task -> served version (its `key` is the cache key).
        self._records: Mapping[str, TaskRecord] = MappingProxyType({})
        self._served: Mapping[str, TaskVersion] = MappingProxyType({})
        self._control = ControlThread("uda-catalog", self._apply)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.store_error: str | None = None  # last store failure, None when the store answers
        # Served tasks the store lost (it restarted empty or was wiped), kept serving from the
        # cache until republished; None when the store lists everything served.
        self.store_warning: str | None = None
        self._store_reset = False  # the store was seen empty or going back while we served
        self.last_reconcile: float | None = None

    # -- reads --------------------------------------------------------------------------------

    def get(self, task: str) -> TaskVersion | None:
        return self._served.get(task)

    def _record(self, task: str) -> TaskRecord:
        return self._records.get(task) or TaskRecord()

    def require(self, task: str) -> TaskVersion:
        """The served version of `task`; InvalidTaskName or UnknownTask otherwise."""
        validate_task_name(task)
        tv = self._served.get(task)
        if tv is None:
            refused = self._record(task).refusal
            if refused is not None:
                raise TaskUnavailable(f"task {task!r} v{refused.version} was refused "
                                      f"({refused.reason}): {refused.detail}")
            raise UnknownTask(f"unknown task {task!r}: GET /tasks lists the published tasks")
        return tv

    def tasks(self) -> dict[str, TaskVersion]:
        return dict(self._served)

    def refusals(self) -> dict[str, Refusal]:
        return {t: r.refusal for t, r in self._records.items() if r.refusal is not None}

    # -- following the store ----------------------------------------------------------------------

    def start(self) -> None:
        self.reconcile()
        for name, target in (("uda-events", self._follow_events), ("uda-reconcile", self._reconcile_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """End the followers, the checks and then the control thread, once it applied what they
        posted; waits at most about `timeout` seconds for a store read in progress. A load that
        ends after this changes nothing."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._verifier is not None:
            self._verifier.close(max(0.0, deadline - time.monotonic()))
        self._control.close(max(0.0, deadline - time.monotonic()))

    def reconcile(self) -> bool:
        """Compare with the store's current versions and apply the differences; False if the store
        did not answer (cached tasks keep serving)."""
        # What was served before the listing: a task the event follower adds while the loop
        # below reads the store is not in `current`, and is no deleted task.
        known = set(self.tasks())
        # A delete that lands after the listing was read makes its entry for that task stale.
        deletions = {t: r.generation for t, r in self._records.items()}
        try:
            # ping first: a directory store whose volume vanished would list "no tasks", and
            # deleting every task then would be wrong; unreachable means keep serving.
            self.store.ping()
            # list_tasks carries each current version's metadata: no info() call per change
            current = {t.task: t.current for t in self.store.list_tasks()}
        except (ResidualStoreError, OSError) as e:
            if self.store_error is None:
                logger.warning("store %s unreachable, serving cached tasks: %s", self.store.url, e)
            self.store_error = f"store {self.store.url} unreachable: {e}"
            if self.metrics is not None:
                self.metrics.store_reachable(False)
            return False
        if self.metrics is not None:
            self.metrics.store_reachable(True)
        if self.store_error is not None:
            logger.info("store %s reachable again", self.store.url)
        self.store_error = None
        self.last_reconcile = time.time()
        self._note_reset(current)
        for task, info in sorted(current.items()):
            served = self.get(task)
            reset = served is not None and info.version < served.version and self._lost(task, served)
            if reset:
                # Versions only increase in a live store: this one restarted and was republished.
                logger.warning("store %s: task %s is back at v%d below the served v%d, the store "
                               "was reset; following it", self.store.url, task, info.version,
                               served.version)
            self.consider(task, info.version, info.sha256, info, reset=reset,
                          deletions=deletions.get(task, 0))
        missing = known - set(current)
        if not self._store_reset:
            for task in missing:
                self._confirmed_remove(task)  # it may have been republished since the listing
            missing = set()
        self._report_missing(missing)
        return True

    def _note_reset(self, current: dict) -> None:
        """An empty store while tasks are served means lost data, not a delete of everything."""
        served = self.tasks()
        if not current and served and not self._store_reset:
            self._store_reset = True
            logger.warning("store %s lists no tasks while %d are served: it restarted empty or "
                           "was wiped; serving them from the cache until they are republished",
                           self.store.url, len(served))

    def catch_up(self, task: str) -> bool:
        """Move `task` towards the store's current version now; True when a newer version than
        the one served before the call is served or staging (loading) now.

        For a served version the store no longer retains (trimmed by newer publishes before this
        server loaded it): the requests waiting for it should get the newer one, not a 503. The
        newer one may already be staging through the event follower or the reconcile loop; then
        the requests wait for that load instead of failing.
        """
        served = self.get(task)
        if served is None:
            return False
        if self._ahead_of(task, served.version):
            return True  # the model thread asks on every wake-up meanwhile: no store read
        try:
            info = self.store.info(task)
        except (ResidualStoreError, OSError):
            return False
        self.consider(task, info.version, info.sha256, info=info)
        return self._ahead_of(task, served.version)

    def _ahead_of(self, task: str, version: int) -> bool:
        """True when `task` is served or staging at a version newer than `version`."""
        rec = self._record(task)
        now, staging = rec.served, rec.staging
        return now is not None and max(now.version, staging[0] if staging else -1) > version

    def _lost(self, task: str, served: TaskVersion) -> bool:
        """True when the store no longer has the served version (it was reset)."""
        try:
            self.store.info(task, served.version)
            return False
        except UnknownTask:
            return True
        except (ResidualStoreError, OSError):
            return False

    def _report_missing(self, missing: set[str]) -> None:
        if missing:
            self.store_warning = (f"store {self.store.url} has no tasks {sorted(missing)[:5]} "
                                  f"({len(missing)} served from the cache): it restarted empty or "
                                  "was wiped; republish them (uda-store publish)")
        elif self._store_reset:
            logger.info("store %s lists every served task again", self.store.url)
            self._store_reset = False
            self.store_warning = None
        if self.metrics is not None:
            self.metrics.tasks_missing(len(missing))

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.reconcile_interval):
            try:
                self.reconcile()
            except Exception:  # the follower must survive anything; the next round retries
                logger.exception("reconcile with the store failed")

    def _follow_events(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                for event in self.store.events(self._stop):
                    if event.kind == "delete":
                        self._confirmed_remove(event.task)
                    elif event.version is not None and event.sha256 is not None:
                        self.consider(event.task, event.version, event.sha256)
                    backoff = 0.5
            except Exception as e:  # reconnect after a pause; reconcile covers the gap
                logger.warning("store events interrupted (%s); retrying in %.1f s", e, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)

    # -- changes: posted by any thread ----------------------------------------------------------

    def consider(self, task: str, version: int, sha256: str, info=None, reset: bool = False,
                 deletions: int | None = None) -> None:
        """React to `task` having current (version, sha256) in the store (`info`: its
        VersionInfo when the caller has it already; `reset`: the store lost the served version
        and numbers again from 1, so a lower version is news; `deletions`: how many deletes of
        the task the catalog had seen when the caller read the store, for a read that may have
        been overtaken by a delete since). Returns once the control thread applied it."""
        if self._overtaken(task, deletions):
            return
        # Decided on the published record, so old news costs no store read and no message; the
        # control thread decides again on the record as it is when the message arrives.
        rec = self._record(task)
        renumbered, news = seen(rec, version, sha256, reset)
        if renumbered is not rec:
            self._control.post(_Seen(task, version, sha256, reset, deletions), wait=True)
        if not news:
            return
        if deletions is None:  # the store is read below: a delete meanwhile overtakes it
            deletions = rec.generation
        try:
            info = info if info is not None else self.store.info(task, version)
        except UnknownTask:
            return  # replaced or deleted meanwhile; the next event or reconcile tells
        except (ResidualStoreError, OSError) as e:
            logger.warning("cannot read %s v%d from the store yet: %s", task, version, e)
            return
        if info.sha256 != sha256:
            return  # changed again meanwhile
        candidate = TaskVersion(task, version, sha256, dict(info.metadata))
        theirs = candidate.metadata.get("base_fingerprint", "")
        mismatch = None if theirs == self.fingerprint else base_mismatch_detail(
            candidate.metadata, self.fingerprint, self.activation)
        self._control.post(_Offered(candidate, reset, mismatch, deletions), wait=True)

    def _overtaken(self, task: str, deletions: int | None) -> bool:
        """True when `task` was deleted since a read that saw `deletions` deletes of it."""
        return deletions is not None and self._record(task).generation != deletions

    def _staged(self, candidate: TaskVersion, future: Future, generation: int,
                reset: bool = False) -> None:
        """A load's or check's done-callback (on a pool thread, or on the control thread when
        the future was done at once). It waits for the control thread to apply the outcome:
        whoever the future wakes next (the cache's on_change, a test's wait) then sees the
        switch or the refusal it led to, as when the callback changed the record itself."""
        cancelled = future.cancelled()  # the check never ran: the catalog stopped
        error = None if cancelled else future.exception()
        reason = refusal_reason(error) if error is not None else None
        refusal = Refusal(candidate.version, candidate.sha256, reason, str(error)) if reason else None
        failed = str(error) if error is not None and reason is None else None
        self._control.post(_Staged(candidate, generation, cancelled, refusal, failed, reset),
                           wait=True)

    def refuse_loaded(self, tv: TaskVersion, error: BaseException) -> None:
        """A load of the served `tv` failed. If the file itself is bad (a refusal), the task
        leaves service with it, like a new task refused before its switch: requests get the
        refusal (503) without the blob being fetched and parsed again, until a new version is
        published. A new task's first version is switched to unchecked (no blob read per task
        at start), so this is where a bad one is found."""
        reason = refusal_reason(error)
        if reason is None:
            return  # not the file's fault (store blip, cache full): the next request tries again
        refusal = Refusal(tv.version, tv.sha256, reason, str(error))  # the loader counted it
        self._control.post(_LoadRefused(tv, refusal), wait=True)

    def _confirmed_remove(self, task: str) -> None:
        """Remove after a delete event or a listing without `task` only if the store, reachable,
        agrees: a directory store whose volume vanished reports every task deleted, and those
        must keep serving."""
        try:
            self.store.ping()
            self.store.info(task)
        except UnknownTask:
            self.remove(task)
        except (ResidualStoreError, OSError) as e:
            logger.warning("not removing %s while the store is unreachable: %s", task, e)

    def remove(self, task: str) -> None:
        self._control.post(_Deleted(task), wait=True)

    # -- changes: applied on the control thread only --------------------------------------------

    def _apply(self, message) -> None:
        """The one place the records change: each message's transition, with its actions."""
        match message:
            case _Seen(task, version, sha256, reset, deletions):
                if not self._overtaken(task, deletions):
                    self._put(task, seen(self._record(task), version, sha256, reset)[0])
            case _Offered():
                self._offer(message)
            case _Staged(c, generation, cancelled, refusal, error, reset):
                self._step(c.task, *staged(self._record(c.task), c, generation,
                                           cancelled=cancelled, refusal=refusal, error=error,
                                           reset=reset))
            case _LoadRefused(tv, refusal):
                self._step(tv.task, *load_refused(self._record(tv.task), tv, refusal))
            case _Deleted(task):
                self._step(task, *deleted(self._record(task)))
            case _:
                raise TypeError(f"not a catalog message: {message!r}")

    def _offer(self, message: _Offered) -> None:
        c = message.candidate
        # Again: the other follower (events vs reconcile) may have refused, staged or switched
        # to this version, or a delete come, since the sender read the store.
        if self._overtaken(c.task, message.deletions):
            return
        rec = self._record(c.task)
        old, pinned = rec.served, c.task in self.cache.pinned
        warm = old is not None and (self.cache.peek(old.key) is not None or pinned)
        stages = self._step(c.task, *offered(rec, c, reset=message.reset, mismatch=message.mismatch,
                                             warm=warm, pinned=pinned,
                                             can_check=self._verify is not None))
        for stage in stages:
            self._stage(stage, message.deletions, message.reset)

    def _step(self, task: str, rec: TaskRecord, actions: list[Action]) -> list[Stage]:
        """Store a transition's record and carry out its actions at once, so the cache, the logs
        and the metrics follow the records in order; returns the loads and checks to start."""
        self._put(task, rec)
        for action in actions:
            if isinstance(action, Switched):
                # In-flight batches hold their entry; the next batch looks the new key up.
                self.cache.evict_task(task, keep_sha=action.new.sha256, reason="replaced")
                self._switched(action)
            elif isinstance(action, Superseded):
                self.cache.evict(action.candidate.key, reason="superseded")
            elif isinstance(action, Refused):
                self._refused(action)
            elif isinstance(action, StageFailed):
                # Not the residual's fault (store blip...): the next reconcile tries again.
                logger.warning("could not stage %s v%d: %s", task, action.candidate.version,
                               action.detail)
            elif isinstance(action, Removed):
                self.cache.evict_task(task, reason="deleted", loading_too=True)
                if action.served is not None:
                    logger.info("task %s deleted from the store", task)
                    if self.metrics is not None:
                        self.metrics.published(len(self._served))
                        self.metrics.forget_task(task)
                    self._on_change()
        return [action for action in actions if isinstance(action, Stage)]

    def _put(self, task: str, rec: TaskRecord) -> None:
        """Store `task`'s record: publish new snapshots of the records and, when its served
        version changed, of the served versions (copied whole: readers hold the old ones)."""
        old = self._records.get(task)
        if old is rec:
            return
        records = dict(self._records)
        records[task] = rec
        self._records = MappingProxyType(records)
        if (old.served if old is not None else None) != rec.served:
            served = {t: r.served for t, r in records.items() if r.served is not None}
            self._served = MappingProxyType(served)

    def _stage(self, action: Stage, generation: int, reset: bool) -> None:
        c = action.candidate
        if action.check:
            # A served version exists but is not resident: check the new file before it
            # replaces it (no device upload), or a bad file would turn a cold good task into a
            # 503. Off this thread: the control thread waiting on one file would hold every
            # other change back.
            future = self._verifier.submit(self._verify, c.task, c.version, c.sha256)
        else:
            future = self.cache.load_async(c.task, c.version, c.sha256)
        future.add_done_callback(lambda f: self._staged(c, f, generation, reset))

    def _switched(self, action: Switched) -> None:
        old, new = action.old, action.new
        if old is None:
            logger.info("task %s v%d published", new.task, new.version)
        else:
            logger.info("task %s now serves v%d (was v%d)", new.task, new.version, old.version)
        if self.metrics is not None:
            self.metrics.published(len(self._served))
            self.metrics.resident(new.task, self.cache.peek(new.key) is not None)
            self.metrics.served_version(new.task, new.version)
        if new.task in self.cache.pinned and self.cache.peek(new.key) is None:
            self.cache.load_async(new.task, new.version, new.sha256)
        self._on_change()

    def _refused(self, action: Refused) -> None:
        c, refusal = action.candidate, action.refusal
        serving = self.get(c.task)
        logger.error("refused %s v%d (%s): %s; %s", c.task, c.version, refusal.reason,
                     refusal.detail,
                     f"v{serving.version} keeps serving" if serving else "the task stays unavailable")
        if self.metrics is not None and not action.counted:
            self.metrics.refusal(refusal.reason)
        if action.unpublished:
            if self.metrics is not None:
                self.metrics.published(len(self._served))
                self.metrics.forget_task(c.task)
            self._on_change()
