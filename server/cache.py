"""Residuals resident on the device: keyed by (task, sha256), bounded in bytes, LRU with pinning.

Every removal goes through ONE hook, `_on_evict`, which keeps the metrics and the log in step.
A missing residual is loaded in a background thread (`load_async`); the model thread keeps
serving other tasks meanwhile and is woken (`on_change`) when the load ends either way.
Repeated loads of one key share one future; a residual that cannot fit next to the pinned ones
raises CacheFull loudly instead of evicting a pinned entry. The cache is the one place that
holds loads in flight: `status(key)` answers resident / loading / failed / absent, and the
failure of a load the model threads wait for stays there until they have told their requests.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import nn

from residual_store import PackedResidual, ParamLayout, Residual
from server.daemon_pool import DaemonPool
from server.errors import CacheFull, ShuttingDown
from server.torch_threads import one_core

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (task, sha256 of the residual blob)


@dataclasses.dataclass(frozen=True)
class CachedResidual:
    """One residual ready to swap in: packed flat deltas and head on the device."""

    task: str
    sha256: str
    version: int
    flat: PackedResidual  # sorted flat index + deltas over the base's flat buffer, packed
    head: nn.Module  # task head in eval mode, on the device
    classes: tuple[str, ...]
    nnz: int  # changed encoder weights
    dsp: int  # downstream parameters (nnz + head parameters)
    nbytes: int  # device bytes held: flat index + values + head tensors

    @property
    def key(self) -> Key:
        return (self.task, self.sha256)


def head_nbytes(head: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in head.state_dict().values())


def resident_form(residual: Residual, layout: ParamLayout, dtype: torch.dtype = torch.float32
                  ) -> PackedResidual:
    """What the cache keeps of a residual's deltas (on the host; the loader moves it to the
    device): one flat index and its values, packed to 6 bytes per entry."""
    return PackedResidual.pack(residual.to_flat(layout, dtype))


def cached_nbytes(flat: PackedResidual, head: nn.Module) -> int:
    """Bytes a residual holds in the cache (packed index + values + head tensors): what
    --cache-bytes is compared with. For a Residual not loaded yet:
    cached_nbytes(resident_form(r, layout), r.build_head())."""
    return flat.nbytes + head_nbytes(head)


class LoadState(enum.Enum):
    ABSENT = "absent"  # neither resident, loading nor a remembered failure: load it
    LOADING = "loading"
    RESIDENT = "resident"
    FAILED = "failed"  # a watched load failed; the error waits to be told (forget_failure)


@dataclasses.dataclass(frozen=True)
class LoadStatus:
    state: LoadState
    entry: CachedResidual | None = None  # when RESIDENT
    error: BaseException | None = None  # when FAILED


Loader = Callable[[str, int, str], CachedResidual]  # (task, version, sha256) -> entry


class ResidualCache:
    """LRU of CachedResidual bounded by `capacity_bytes`; tasks in `pinned` are never evicted,
    except an old version of one by its new version."""

    def __init__(self, capacity_bytes: int, loader: Loader, *, metrics=None,
                 on_change: Callable[[], None] | None = None, workers: int = 2):
        self.capacity_bytes = capacity_bytes
        self.oversized: dict[str, int] = {}  # task -> bytes of a residual larger than the budget
        # (task, sha256) -> why a residual larger than the whole budget failed: asked for again,
        # it fails at once instead of re-reading and re-parsing the file every request.
        self._too_big: dict[Key, str] = {}
        self._loader = loader
        self._metrics = metrics
        self._on_change = on_change or (lambda: None)
        self._entries: OrderedDict[Key, CachedResidual] = OrderedDict()  # oldest use first
        self._pinned: set[str] = set()
        self._loading: dict[Key, Future] = {}
        self._unwanted: set[Key] = set()  # loading, but of a deleted task: not inserted
        # Loads whose failure is remembered (requests wait for them), and those failures
        self._watched: set[Key] = set()
        self._failed: dict[Key, tuple[Future, BaseException]] = {}
        self._lock = threading.RLock()
        self._pool = DaemonPool(workers, "uda-load", initializer=one_core)
        self.bytes_used = 0

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: Key) -> CachedResidual | None:
        """The resident entry (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def peek(self, key: Key) -> CachedResidual | None:
        """The resident entry without touching the LRU order."""
        with self._lock:
            return self._entries.get(key)

    def keys(self) -> list[Key]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def resident_tasks(self) -> set[str]:
        with self._lock:
            return {task for task, _ in self._entries}

    def is_loading(self, key: Key) -> bool:
        with self._lock:
            return key in self._loading

    def status(self, key: Key, watch: bool = False) -> LoadStatus:
        """Where `key` stands; with `watch`, a load in flight that fails is remembered as FAILED
        (the model thread's requests wait for it) instead of leaving the key ABSENT."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return LoadStatus(LoadState.RESIDENT, entry=entry)
            if key in self._loading:
                if watch:
                    self._watched.add(key)
                return LoadStatus(LoadState.LOADING)
            failed = self._failed.get(key)
            if failed is not None:
                return LoadStatus(LoadState.FAILED, error=failed[1])
            return LoadStatus(LoadState.ABSENT)

    def forget_failure(self, key: Key) -> None:
        """The failure of `key` was told: the next request loads it again."""
        with self._lock:
            self._failed.pop(key, None)

    def forget_failures(self, keep: Callable[[Key], bool] = lambda key: False) -> None:
        """Drop the remembered failures but those `keep` is true of: a failure nobody waits for
        any more would fail a later request with a stale error instead of loading again."""
        with self._lock:
            self._failed = {k: f for k, f in self._failed.items() if keep(k)}

    def unwatch_task(self, task: str) -> None:
        """Forget the failures of `task`'s loads and stop watching the ones in flight: a batch
        of its served version ran, so nobody waits for them (a superseded version's load that
        fails later must not fail a later request)."""
        with self._lock:
            self._failed = {k: f for k, f in self._failed.items() if k[0] != task}
            self._watched = {k for k in self._watched if k[0] != task}

    def watched_loads(self) -> dict[Key, Future]:
        """The loads the model threads wait for: running, or failed and not yet told."""
        with self._lock:
            return {**{k: f for k, f in self._loading.items() if k in self._watched},
                    **{k: f for k, (f, _) in self._failed.items()}}

    def __len__(self) -> int:
        return len(self._entries)

    # -- pinning ------------------------------------------------------------------------------

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def pin(self, task: str) -> None:
        with self._lock:
            self._pinned.add(task)

    def unpin(self, task: str) -> None:
        with self._lock:
            self._pinned.discard(task)

    # -- writes -------------------------------------------------------------------------------

    def put(self, entry: CachedResidual) -> None:
        """Insert (or refresh) `entry`, evicting least recently used unpinned entries to fit."""
        with self._lock:
            if entry.key in self._entries:
                self._entries.move_to_end(entry.key)
                return
            self._make_room(entry)
            self._entries[entry.key] = entry
            self.bytes_used += entry.nbytes
            self._record_state(entry.task)
        logger.debug("resident %s v%d (%d bytes)", entry.task, entry.version, entry.nbytes)

    def _make_room(self, entry: CachedResidual) -> None:
        # Least recently used unpinned entries first; then other versions of entry's own task,
        # even pinned (pinning is by task name): the new version replaces them once the catalog
        # switches to it, and in a budget sized to the pins it could never load otherwise.
        victims = [(k, "lru") for k in self._entries if k[0] not in self._pinned]
        victims += [(k, "replaced") for k in self._entries if k[0] == entry.task and k[0] in self._pinned]
        evictable = sum(self._entries[k].nbytes for k, _ in victims)
        if entry.nbytes > self.capacity_bytes:
            # No eviction can help: every request of the task would load and fail again.
            self.oversized[entry.task] = entry.nbytes
        else:
            self.oversized.pop(entry.task, None)
        if self.bytes_used - evictable + entry.nbytes > self.capacity_bytes:
            full = CacheFull(
                f"residual of task {entry.task!r} needs {entry.nbytes} bytes; --cache-bytes "
                f"{self.capacity_bytes} holds {self.bytes_used - evictable} bytes of pinned "
                "residuals: raise --cache-bytes or pin fewer tasks")
            if entry.nbytes > self.capacity_bytes:
                self._too_big[entry.key] = str(full)
            raise full
        for key, reason in victims:
            if self.bytes_used + entry.nbytes <= self.capacity_bytes:
                break
            self._remove(key, reason)

    def evict(self, key: Key, reason: str = "unload") -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._remove(key, reason)
            return True

    def evict_task(self, task: str, keep_sha: str | None = None, reason: str = "stale",
                   loading_too: bool = False) -> int:
        """Drop every resident version of `task` except `keep_sha`; returns how many. With
        `loading_too` (the task was deleted) the loads in flight are not inserted when they end,
        unless someone asks for them again meanwhile."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == task and k[1] != keep_sha]
            for key in keys:
                self._remove(key, reason)
            if loading_too:
                for key in [k for k in self._too_big if k[0] == task and k[1] != keep_sha]:
                    del self._too_big[key]
                self._unwanted.update(k for k in self._loading if k[0] == task and k[1] != keep_sha)
            return len(keys)

    def _remove(self, key: Key, reason: str) -> None:
        entry = self._entries.pop(key)
        self.bytes_used -= entry.nbytes
        self._on_evict(entry, reason)

    def _on_evict(self, entry: CachedResidual, reason: str) -> None:
        """The one place every removal passes: metrics, residency gauge, log."""
        logger.info("evicted %s v%d (%d bytes, %s)", entry.task, entry.version, entry.nbytes, reason)
        if self._metrics is not None:
            self._metrics.evicted()
        self._record_state(entry.task)

    def _record_state(self, task: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_state(self.bytes_used, len(self._entries))
            self._metrics.resident(task, any(t == task for t, _ in self._entries))

    # -- loading ------------------------------------------------------------------------------

    def load_async(self, task: str, version: int, sha256: str, watch: bool = False) -> Future:
        """Future of the entry for (task, sha256): done at once when resident, else loaded in
        a background thread and inserted; `on_change` is called when the load ends. With
        `watch`, its failure is remembered (see status)."""
        key = (task, sha256)
        with self._lock:
            if watch:
                self._watched.add(key)
            entry = self._entries.get(key)
            if entry is not None:
                done: Future = Future()
                done.set_result(entry)
                return done
            if key in self._too_big:  # cannot fit whatever is evicted: no read, no parse
                failed: Future = Future()
                error = CacheFull(self._too_big[key])
                failed.set_exception(error)
                self._ended(key, failed, error)  # told to the model thread like a load's failure
                return failed
            future = self._loading.get(key)
            if future is not None:
                self._unwanted.discard(key)  # wanted again (the task was republished)
                return future
            future = Future()
            self._loading[key] = future
            self._failed.pop(key, None)  # loading again
        if self._metrics is not None:
            self._metrics.cache_miss()
        job = self._pool.submit(self._load, key, version, future)
        job.add_done_callback(lambda j: j.cancelled() and self._abandon(key, future))
        return future

    def _abandon(self, key: Key, future: Future) -> None:
        """A load that will never run (the cache closed): whoever waits gets ShuttingDown."""
        error = ShuttingDown(f"the server is stopping: {key[0]} was not loaded")
        with self._lock:
            if self._loading.get(key) is future:
                del self._loading[key]
                self._ended(key, future, error)
            self._unwanted.discard(key)
        future.set_exception(error)

    def _ended(self, key: Key, future: Future, error: BaseException | None) -> None:
        """A load of `key` ended: remember its failure if watched. Called with the lock held, in
        the same critical section that ends the load, so `status` never says ABSENT between."""
        if error is not None and key in self._watched:
            self._failed[key] = (future, error)
        self._watched.discard(key)

    def _load(self, key: Key, version: int, future: Future) -> None:
        t0 = time.perf_counter()
        try:
            entry = self._loader(key[0], version, key[1])
            with self._lock:
                if key in self._unwanted:
                    self._unwanted.discard(key)
                    logger.info("not keeping %s v%d: the task was deleted while it loaded",
                                key[0], version)
                else:
                    self.put(entry)
        except BaseException as e:  # handed to the waiting requests, never lost in the pool
            logger.warning("loading %s (%s) v%d failed: %s", key[0], key[1][:12], version, e)
            with self._lock:
                self._loading.pop(key, None)
                self._unwanted.discard(key)
                self._ended(key, future, e)
            future.set_exception(e)
        else:
            if self._metrics is not None:
                self._metrics.observe_load(time.perf_counter() - t0)
            with self._lock:
                self._loading.pop(key, None)
                self._ended(key, future, None)
            future.set_result(entry)
        finally:
            self._on_change()

    def close(self, timeout: float = 10.0) -> None:
        """Drop the loads not started; wait up to `timeout` seconds for the running ones."""
        self._pool.close(timeout)
