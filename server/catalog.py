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
import json
import logging
import threading
import time
from concurrent.futures import Future

from residual_store.errors import ResidualStoreError, UnknownTask
from residual_store.residual import base_mismatch_detail
from residual_store.stores import validate_task_name
from server.daemon_pool import DaemonPool
from server.errors import TaskUnavailable
from server.loader import refusal_reason

logger = logging.getLogger(__name__)

_VERIFY_WORKERS = 2  # concurrent checks of new versions of cold tasks (each reads one file)


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


class Catalog:
    """The served version of every published task; thread-safe."""

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
        self._tasks: dict[str, TaskVersion] = {}
        self._refused: dict[str, Refusal] = {}
        # task -> (version, sha256) being loaded or checked before the switch
        self._staging: dict[str, tuple[int, str]] = {}
        # task -> how many times it was deleted: a load or check begun before a delete must not
        # bring the task back when it ends
        self._deletions: dict[str, int] = {}
        self._lock = threading.RLock()
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
        return self._tasks.get(task)

    def require(self, task: str) -> TaskVersion:
        """The served version of `task`; InvalidTaskName or UnknownTask otherwise."""
        validate_task_name(task)
        tv = self._tasks.get(task)
        if tv is None:
            refused = self._refused.get(task)
            if refused is not None:
                raise TaskUnavailable(f"task {task!r} v{refused.version} was refused "
                                      f"({refused.reason}): {refused.detail}")
            raise UnknownTask(f"unknown task {task!r}: GET /tasks lists the published tasks")
        return tv

    def tasks(self) -> dict[str, TaskVersion]:
        with self._lock:
            return dict(self._tasks)

    def refusals(self) -> dict[str, Refusal]:
        with self._lock:
            return dict(self._refused)

    # -- following the store ----------------------------------------------------------------------

    def start(self) -> None:
        self.reconcile()
        for name, target in (("uda-events", self._follow_events), ("uda-reconcile", self._reconcile_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """End the followers and the checks; waits at most about `timeout` seconds for a store
        read in progress."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._verifier is not None:
            self._verifier.close(max(0.0, deadline - time.monotonic()))

    def reconcile(self) -> bool:
        """Compare with the store's current versions and apply the differences; False if the store
        did not answer (cached tasks keep serving)."""
        # What was served before the listing: a task the event follower adds while the loop
        # below reads the store is not in `current`, and is no deleted task.
        known = set(self.tasks())
        with self._lock:
            # A delete that lands after the listing was read makes its entry for that task stale.
            deletions = dict(self._deletions)
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
            served = self._tasks.get(task)
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
        if not current and self._tasks and not self._store_reset:
            self._store_reset = True
            logger.warning("store %s lists no tasks while %d are served: it restarted empty or "
                           "was wiped; serving them from the cache until they are republished",
                           self.store.url, len(self._tasks))

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
        with self._lock:
            now = self._tasks.get(task)
            staged = self._staging.get(task)
            return now is not None and max(now.version, staged[0] if staged else -1) > version

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

    # -- changes ------------------------------------------------------------------------------------

    def consider(self, task: str, version: int, sha256: str, info=None, reset: bool = False,
                 deletions: int | None = None) -> None:
        """React to `task` having current (version, sha256) in the store (`info`: its
        VersionInfo when the caller has it already; `reset`: the store lost the served version
        and numbers again from 1, so a lower version is news; `deletions`: how many deletes of
        the task the catalog had seen when the caller read the store, for a read that may have
        been overtaken by a delete since)."""
        with self._lock:
            if self._overtaken(task, deletions) or self._settled(task, version, sha256, reset):
                return
            if deletions is None:  # the store is read below: a delete meanwhile overtakes it
                deletions = self._deletions.get(task, 0)
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
        with self._lock:
            # Again: the lock was released for the store read, and the other follower (events
            # vs reconcile) may have refused, staged or switched to this version meanwhile.
            if self._overtaken(task, deletions) or self._settled(task, version, sha256, reset):
                return
            if theirs != self.fingerprint:
                self._refuse(candidate, "base_mismatch",
                             base_mismatch_detail(candidate.metadata, self.fingerprint, self.activation))
                return
            old = self._tasks.get(task)
            warm = old is not None and (self.cache.peek(old.key) is not None or task in self.cache.pinned)
            cold_known = old is not None and not warm and self._verify is not None
            if warm or cold_known or (old is None and task in self.cache.pinned):
                self._staging[task] = (version, sha256)
            else:
                self._switch(candidate, reset)
                return
        if cold_known:
            # A served version exists but is not resident: check the new file before it replaces
            # it (no device upload), or a bad file would turn a cold good task into a 503. Off
            # this thread: a follower waiting on one file would hold every other change back.
            future = self._verifier.submit(self._verify, task, version, sha256)
        else:
            future = self.cache.load_async(task, version, sha256)
        future.add_done_callback(lambda f, c=candidate: self._staged(c, f, deletions, reset))

    def _overtaken(self, task: str, deletions: int | None) -> bool:
        """True when `task` was deleted since a read that saw `deletions` deletes of it."""
        return deletions is not None and self._deletions.get(task, 0) != deletions

    def _settled(self, task: str, version: int, sha256: str, reset: bool) -> bool:
        """True when the store's (version, sha256) of `task` needs nothing more from consider:
        old news, the served bytes under a new number (recorded here), refused or loading
        already. Called with the lock held."""
        old = self._tasks.get(task)
        if old is not None and version <= old.version and not (reset and version != old.version):
            return True  # old news (events and reconcile overlap)
        if old is not None and old.sha256 == sha256:
            # Same bytes under a higher number (a rollback to what is served): nothing to load.
            self._tasks[task] = dataclasses.replace(old, version=version)
            return True
        refused = self._refused.get(task)
        if refused is not None and (refused.version, refused.sha256) == (version, sha256):
            # Counted and logged once already. The sha too: a store reset numbers from 1 again,
            # and the file refused as v1 before it says nothing about the v1 of now.
            return True
        staged = self._staging.get(task)
        if staged == (version, sha256):
            return True  # loading or checked already, after a store reset too
        return staged is not None and staged[0] >= version and not reset  # a newer one loading

    def _staged(self, candidate: TaskVersion, future: Future, deletions: int,
                reset: bool = False) -> None:
        cancelled = future.cancelled()  # the check never ran: the catalog stopped
        error = None if cancelled else future.exception()
        reason = refusal_reason(error) if error is not None else None
        with self._lock:
            if self._staging.get(candidate.task) == (candidate.version, candidate.sha256):
                del self._staging[candidate.task]
            if cancelled:
                return
            if self._overtaken(candidate.task, deletions):
                return  # deleted while it loaded (the cache did not keep the entry either)
            if error is None:
                self._switch(candidate, reset)
                return
            if reason is not None:
                # Recorded in the same critical section that ends the staging, so the other
                # follower (events vs reconcile) cannot stage, count and log it a second time.
                self._refused[candidate.task] = Refusal(candidate.version, candidate.sha256,
                                                        reason, str(error))
        if reason is None:
            # Not the residual's fault (store blip...): the next reconcile tries again.
            logger.warning("could not stage %s v%d: %s", candidate.task, candidate.version, error)
            return
        self._refuse(candidate, reason, str(error), counted=True)

    def _switch(self, candidate: TaskVersion, reset: bool = False) -> None:
        with self._lock:
            old = self._tasks.get(candidate.task)
            if old is not None and candidate.version <= old.version and not reset:
                # Superseded while it loaded (a newer version switched first): its entry would
                # sit in the cache unused, and forever for a pinned task.
                if candidate.sha256 != old.sha256:
                    self.cache.evict(candidate.key, reason="superseded")
                return
            self._tasks[candidate.task] = candidate
            self._refused.pop(candidate.task, None)
            # In-flight batches hold their entry; the next batch looks the new key up.
            self.cache.evict_task(candidate.task, keep_sha=candidate.sha256, reason="replaced")
            count = len(self._tasks)
        if old is None:
            logger.info("task %s v%d published", candidate.task, candidate.version)
        else:
            logger.info("task %s now serves v%d (was v%d)", candidate.task, candidate.version, old.version)
        if self.metrics is not None:
            self.metrics.published(count)
            self.metrics.resident(candidate.task, self.cache.peek(candidate.key) is not None)
            self.metrics.served_version(candidate.task, candidate.version)
        if candidate.task in self.cache.pinned and self.cache.peek(candidate.key) is None:
            self.cache.load_async(candidate.task, candidate.version, candidate.sha256)
        self._on_change()

    def _refuse(self, candidate: TaskVersion, reason: str, detail: str, counted: bool = False) -> None:
        with self._lock:
            self._refused[candidate.task] = Refusal(candidate.version, candidate.sha256, reason, detail)
            serving = self._tasks.get(candidate.task)
        logger.error("refused %s v%d (%s): %s; %s", candidate.task, candidate.version, reason, detail,
                     f"v{serving.version} keeps serving" if serving else "the task stays unavailable")
        if self.metrics is not None and not counted:
            self.metrics.refusal(reason)

    def refuse_loaded(self, tv: TaskVersion, error: BaseException) -> None:
        """A load of the served `tv` failed. If the file itself is bad (a refusal), the task
        leaves service with it, like a new task refused before its switch: requests get the
        refusal (503) without the blob being fetched and parsed again, until a new version is
        published. A new task's first version is switched to unchecked (no blob read per task
        at start), so this is where a bad one is found."""
        reason = refusal_reason(error)
        if reason is None:
            return  # not the file's fault (store blip, cache full): the next request tries again
        with self._lock:
            served = self._tasks.get(tv.task)
            if served is None or served.sha256 != tv.sha256:
                return  # moved on meanwhile, or refused already (by the other model thread)
            del self._tasks[tv.task]
            self._refuse(served, reason, str(error), counted=True)  # the loader counted it
            count = len(self._tasks)
        if self.metrics is not None:
            self.metrics.published(count)
            self.metrics.forget_task(tv.task)
        self._on_change()

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
        with self._lock:
            self._refused.pop(task, None)
            self._staging.pop(task, None)
            self._deletions[task] = self._deletions.get(task, 0) + 1
            self.cache.evict_task(task, reason="deleted", loading_too=True)
            if self._tasks.pop(task, None) is None:
                return
            count = len(self._tasks)
        logger.info("task %s deleted from the store", task)
        if self.metrics is not None:
            self.metrics.published(count)
            self.metrics.forget_task(task)
        self._on_change()
