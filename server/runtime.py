"""One serving process assembled: store, engines, cache, catalog, batcher, model threads, decoder.

`start()` does the heavy work (building the base, listing the store, preloading); nothing heavy
happens in `__init__`. The HTTP layer (app.py) calls the async operations here and translates
their domain exceptions at its edge.

With `--streams N` (CPU only) N model threads share the batcher, the cache and the catalog, each
with its own engine (a replica of the base) and cores/N torch threads. A one-image forward pass
on two threads leaves much of the second core idle; two one-thread streams keep both busy at
any batch size, which is what hundreds of tasks with one queued image each need.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from residual_store.errors import StoreUnavailable, one_line
from residual_store.stores import open_store
from server.batcher import Batcher, PendingRequest
from server.cache import ResidualCache
from server.catalog import Catalog, TaskVersion
from server.config import ServeConfig
from server.engine import SwapEngine, resolve_device
from server.errors import Conflict, ImageRejected, NotReady, RequestTimeout
from server.images import ImageDecoder
from server.loader import ResidualLoader, refusal_reason
from server.log_hygiene import install_log_filters, public_detail
from server.metrics import Metrics
from server.torch_threads import cores, one_core, use_cores
from server.worker import BatchResult, ModelWorker

logger = logging.getLogger(__name__)

_STARTUP_LOAD_TIMEOUT_S = 300.0
_RELOAD_TIMEOUT_S = 10.0  # at most this long (and --request-timeout) for /admin/reload
_STORE_READ_WAIT_S = 10.0  # how long a stop waits for a residual load or check in flight


class ServeRuntime:
    """Everything behind the HTTP routes of one uda-serve process."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.store = open_store(config.store)
        self.engine = SwapEngine(config.base_spec(), config.device, config.precision)
        self.engines: list[SwapEngine] = [self.engine]  # + replicas with --streams
        self.threads_per_stream = cores()
        self._threads_before: int | None = None  # torch's setting, put back by stop()
        self.cache: ResidualCache | None = None
        self.catalog: Catalog | None = None
        self.batcher: Batcher | None = None
        self.workers: list[ModelWorker] = []
        self.decoder: ImageDecoder | None = None
        self.started = False
        self.stopped = False
        self.startup_problems: list[str] = []  # preload/pin tasks that could not be loaded

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Build the base (and its replicas), follow the store, preload and pin, start the model
        threads."""
        cfg = self.config
        install_log_filters()
        if cfg.streams > 1 and resolve_device(cfg.device).type != "cpu":
            raise ValueError(f"--streams {cfg.streams} is for CPUs; on {cfg.device} one model thread "
                             "keeps the accelerator busy: use --streams 1")
        self._split_threads(cfg.streams)
        self.engine.setup()
        self.engines += [self.engine.replica() for _ in range(cfg.streams - 1)]
        self.batcher = Batcher(cfg.max_batch, cfg.max_wait_s, cfg.max_queue,
                               on_depth=self.metrics.queue, streams=cfg.streams)
        self.metrics.capacity(cfg.max_queue)
        loader = ResidualLoader(self.store, self.engine, self.metrics, host_tier_bytes=cfg.cache_bytes,
                                max_precision_drop=cfg.max_precision_drop)
        self.cache = ResidualCache(cfg.cache_bytes, loader, metrics=self.metrics,
                                   on_change=self.batcher.notify)
        for task in cfg.pin:
            self.cache.pin(task)
        self.catalog = Catalog(self.store, self.cache, self.engine.fingerprint, self.metrics,
                               cfg.reconcile_interval, on_change=self.batcher.notify,
                               verify=loader.verify, activation=self.engine.activation)
        self.decoder = ImageDecoder(self.engine.input_size, cfg.max_image_bytes,
                                    cfg.max_image_pixels, cfg.decode_workers,
                                    max_side=cfg.max_image_side, max_aspect=cfg.max_image_aspect,
                                    max_request_pixels=cfg.max_request_pixels)
        self.workers = [ModelWorker(engine, self.cache, self.catalog, self.batcher, self.metrics,
                                    name=f"uda-model-{i}", cores=self.threads_per_stream)
                        for i, engine in enumerate(self.engines)]
        self.catalog.start()
        self._preload()
        for worker in self.workers:
            worker.start()
        one_core()  # each model thread set its share, which threads starting torch later would take
        self.started = True

    def _split_threads(self, streams: int) -> None:
        """cores/streams torch threads for each model thread, which sets them itself; this
        thread, which builds the base, and every other one use one (server/torch_threads.py)."""
        self._threads_before = cores()
        self.threads_per_stream = max(1, self._threads_before // streams)
        if streams > self._threads_before:
            logger.warning("--streams %d is more than the %d cores torch uses: streams will share "
                           "cores and each forward pass gets slower", streams, self._threads_before)
        one_core()
        if streams > 1:
            logger.info("%d model streams x %d torch thread(s)", streams, self.threads_per_stream)

    def _preload(self) -> None:
        futures = {}
        for task in dict.fromkeys(self.config.pin + self.config.preload):
            tv = self.catalog.get(task)
            if tv is None:
                problem = f"--preload/--pin task {task!r} is not in the store {self.store.url}"
                if self.catalog.store_error:
                    problem += f" ({self.catalog.store_error})"
                self.startup_problems.append(problem)
                logger.warning("%s; it is loaded once published", problem)
                continue
            futures[task] = self.cache.load_async(tv.task, tv.version, tv.sha256)
        for task, future in futures.items():
            try:
                future.result(timeout=_STARTUP_LOAD_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - reported, the server still serves the rest
                self.startup_problems.append(f"could not preload {task!r}: {e}")
                logger.error("could not preload %s: %s", task, e)

    def begin_drain(self) -> None:
        """Refuse new work and fail readiness at once; queued requests still get answered.

        Called from the SIGTERM handler: uvicorn only closes its listening socket on its next
        tick, and a request accepted in between must not be queued behind the drain.
        """
        if self.batcher is not None:
            self.batcher.close()

    def begin_stop(self, grace: float | None = None) -> None:
        """Refuse new work; the model threads answer what is queued within `grace` seconds
        (--grace-period by default; 0: only the batches already running) and then exit."""
        self.begin_drain()
        for worker in self.workers:
            worker.begin_stop(self.config.grace_period if grace is None else grace)

    def stop(self, grace: float | None = None) -> None:
        """Finish queued requests within `grace` seconds (--grace-period by default), fail the
        rest, then release everything."""
        if self.stopped:
            return
        self.stopped = True
        grace = self.config.grace_period if grace is None else grace
        self.begin_stop(grace)
        dropped = sum(worker.finish_stop(grace) for worker in self.workers)
        if dropped:
            logger.warning("stopped with %d request(s) still queued; they were answered 503", dropped)
        # A store read in flight (a residual load, a version check) is waited for a while, not
        # forever (a hung store), and not at all when the stop is forced (grace 0).
        wait_s = _STORE_READ_WAIT_S if grace > 0 else 0.0
        if self.catalog is not None:
            self.catalog.stop(wait_s)
        if self.cache is not None:
            self.cache.close(wait_s)
        if self.decoder is not None:
            self.decoder.close()
        try:
            self.store.close()
        except Exception:  # noqa: BLE001 - closing is best-effort at exit
            logger.debug("closing the store failed", exc_info=True)
        if self._threads_before is not None:
            use_cores(self._threads_before)

    # -- health ----------------------------------------------------------------------------------

    def readiness(self, require_store: bool = True) -> list[str]:
        """What keeps the server from being ready; empty when it is.

        With `require_store=False` only this process's own state counts (base, model thread,
        shutdown): cached tasks keep serving while the store is away, so a fleet-wide probe
        must not take every replica out of service for one Redis outage.
        """
        problems = []
        if not self.started or not self.engine.ready:
            problems.append("base model not loaded yet")
        elif self.stopped or (self.batcher is not None and self.batcher.closed):
            problems.append("shutting down")
        elif not all(worker.alive for worker in self.workers):
            problems.append("model thread stopped")
        if self.cache is not None and self.cache.oversized:
            task, need = max(self.cache.oversized.items(), key=lambda kv: kv[1])
            problems.append(f"--cache-bytes {self.cache.capacity_bytes} is smaller than the "
                            f"residual of task {task} ({need} bytes): raise --cache-bytes")
        problems += self._nothing_servable()
        if require_store:
            problems += self.store_problems()
        return problems

    def _nothing_servable(self) -> list[str]:
        """A store whose every task is refused (say, all trained on another base) leaves nothing
        to serve: that is a misconfiguration to surface, not a ready server with 0 tasks."""
        if self.catalog is None or self.catalog.tasks():
            return []
        refusals = sorted(self.catalog.refusals().items())
        if not refusals:
            return []  # an empty store: ready, waiting for a first publish
        shown = "; ".join(f"{task} v{r.version} ({r.reason})" for task, r in refusals[:3])
        more = f" and {len(refusals) - 3} more" if len(refusals) > 3 else ""
        return [f"none of the {len(refusals)} published task(s) can be served, all were refused: "
                f"{shown}{more}; GET /tasks says why"]

    def store_problems(self) -> list[str]:
        """What is wrong with the residual store (unreachable, tasks gone); empty when fine."""
        if self.catalog is None:
            return []
        return [p for p in (self.catalog.store_error, self.catalog.store_warning) if p]

    def describe(self) -> dict[str, Any]:
        """Base and store identity for /healthz and /readyz."""
        return {"base_model": self.engine.spec.model,
                "base_pretrained": self.engine.spec.pretrained_label,
                "fingerprint": self.engine.fingerprint,
                "precision": self.engine.precision,
                "device": str(self.engine.device) if self.engine.device else None,
                "store": self.store.url}

    # -- inference ---------------------------------------------------------------------------------

    def require_task(self, task: str) -> TaskVersion:
        self._require_started()
        return self.catalog.require(task)

    def is_published(self, task: str) -> bool:
        return self.catalog is not None and self.catalog.get(task) is not None

    def published_count(self) -> int:
        return len(self.catalog.tasks())

    def is_resident(self, tv: TaskVersion) -> bool:
        return self.cache.peek(tv.key) is not None

    async def infer(self, task: str, uploads: list[tuple[str, bytes]],
                    version: TaskVersion | None = None) -> BatchResult:
        """Scores of every upload under `task`'s current residual, or under `version` (one the
        store keeps, asked for by number; loaded into the cache like any other)."""
        served = self.require_task(task)
        pinned = version if version is not None and version.version != served.version else None
        if not uploads:
            raise ImageRejected("bad_request", "no image: send one or more multipart `file` "
                                               "fields or an image/* body")
        if len(uploads) > self.config.max_batch:
            raise ImageRejected("too_large", f"{len(uploads)} images in one request, the limit "
                                             f"is {self.config.max_batch} (--max-batch)")
        loop = asyncio.get_running_loop()
        timeout = self.config.request_timeout
        deadline = loop.time() + timeout  # decoding counts: one --request-timeout for both
        try:
            images = await asyncio.wait_for(self.decoder.decode_many(uploads), timeout)
        except TimeoutError as e:
            raise RequestTimeout(f"the images were not decoded within --request-timeout "
                                 f"{timeout:g} s") from e
        left = max(deadline - loop.time(), 0.001)
        future: asyncio.Future = loop.create_future()
        now = self.batcher.clock()
        request = PendingRequest(task, images, now, now + left,
                                 lambda value: _settle_from_thread(loop, future, value), pinned)
        self.batcher.submit(request)
        try:
            return await asyncio.wait_for(future, left)
        except TimeoutError as e:
            raise RequestTimeout(f"no answer within --request-timeout {timeout:g} s") from e
        finally:
            # wait_for cancels `future` whenever it gives up, on its timeout and when this task is
            # cancelled (uvicorn cancels the requests still open when its graceful shutdown times
            # out): nobody will read the answer, so the work leaves the queue.
            if future.cancelled():
                self.batcher.cancel(request)

    # -- listing -----------------------------------------------------------------------------------

    def task_entries(self) -> list[dict[str, Any]]:
        self._require_started()
        refusals = self.catalog.refusals()
        out = [self._task_entry(tv, refusals.get(tv.task)) for tv in self.catalog.tasks().values()]
        for task, refusal in refusals.items():
            if self.catalog.get(task) is None:
                out.append({"task": task, "version": None, "servable": False,
                            "refused": _refusal_dict(refusal)})
        return sorted(out, key=lambda e: e["task"])

    def task_entry(self, task: str) -> dict[str, Any]:
        tv = self.require_task(task)
        return self._task_entry(tv, self.catalog.refusals().get(task))

    def _task_entry(self, tv: TaskVersion, refusal) -> dict[str, Any]:
        entry = self.cache.peek(tv.key)
        return {
            "task": tv.task, "version": tv.version, "sha256": tv.sha256,
            "classes": tv.classes, "nnz": entry.nnz if entry else None,  # known once loaded
            "dsp": tv.dsp, "resident": entry is not None, "pinned": tv.task in self.cache.pinned,
            "precision": self.engine.precision, "servable": True,
            "refused": _refusal_dict(refusal) if refusal else None,
        }

    # -- admin -------------------------------------------------------------------------------------

    async def load(self, task: str) -> dict[str, Any]:
        tv = self.require_task(task)
        future = self.cache.load_async(tv.task, tv.version, tv.sha256)
        try:
            await asyncio.wrap_future(future)
        except Exception as e:
            reason = refusal_reason(e)
            if reason is None:
                raise
            # The file is bad, not the store: the task leaves service as a request's load would
            # take it out, and the operator learns why instead of a generic store error.
            self.catalog.refuse_loaded(tv, e)
            raise Conflict(f"{task} v{tv.version} was refused ({reason}): {one_line(e)}") from e
        self.batcher.notify()
        return self.task_entry(task)

    def unload(self, task: str) -> dict[str, Any]:
        tv = self.require_task(task)
        if task in self.cache.pinned:
            raise Conflict(f"task {task!r} is pinned (--pin) and stays resident")
        self.cache.evict_task(tv.task, reason="admin unload")
        return self.task_entry(task)

    async def reload(self) -> dict[str, Any]:
        self._require_started()
        bound = min(self.config.request_timeout, _RELOAD_TIMEOUT_S)
        try:
            # A hung store must not hold the admin call (the thread ends with the store's own
            # socket timeout; the reconcile loop goes on meanwhile).
            ok = await asyncio.wait_for(asyncio.to_thread(self.catalog.reconcile), bound)
        except TimeoutError:
            raise StoreUnavailable(f"store {self.store.url} did not answer the reload within "
                                   f"{bound:g} s") from None
        if not ok:
            raise StoreUnavailable(self.catalog.store_error or f"store {self.store.url} unreachable")
        return {"tasks": {t: tv.version for t, tv in sorted(self.catalog.tasks().items())}}

    async def fingerprints_now(self) -> list[str]:
        """Each stream's base fingerprint now, applied residuals removed first."""
        self._require_started()
        return await asyncio.to_thread(lambda: [engine.fingerprint_now() for engine in self.engines])

    async def fingerprint_report(self) -> dict[str, Any]:
        """The base weights' sha256 now (any applied residual removed first) vs. at start, and
        how many batches and swaps the model threads ran."""
        streams = await self.fingerprints_now()
        expected = self.engine.resident_fingerprint  # the bf16 weights' own with --precision bf16
        changed = [fp for fp in streams if fp != expected]
        return {"fingerprint": changed[0] if changed else expected, "expected": expected,
                "unchanged": not changed, "streams": streams,
                "batches": sum(w.batches for w in self.workers),
                "swaps": sum(w.swaps for w in self.workers)}

    def _require_started(self) -> None:
        if not self.started:
            raise NotReady("the server is starting: the base model is not loaded yet")


def _settle_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, value)
    except RuntimeError:  # the loop is closed (a forced exit): nobody waits for the answer
        pass


def _settle(future: asyncio.Future, value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _refusal_dict(refusal) -> dict[str, Any]:
    return {"version": refusal.version, "reason": refusal.reason,
            "detail": public_detail(refusal.detail)}

