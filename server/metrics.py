"""Prometheus metrics of one server, on its own registry (several servers fit in one test process).

Label values are only ever names of published tasks: callers pass a task name only after the
catalog confirmed it, and `forget_task` drops the per-task gauges of a deleted task. Every
recording is best-effort: a failing metrics call is logged once and never fails a request.
"""
from __future__ import annotations

import functools
import logging

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from residual_store.precision import PRECISIONS

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SWAP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The reason labels server.loader.refusal_reason and the catalog give (a closed set).
REFUSAL_REASONS = ("base_mismatch", "invalid_format", "integrity", "load_failed", "precision")


def _safe(method):
    """A metrics method that logs its first failure and otherwise stays silent."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except Exception:  # metrics must never fail a request
            if not self._warned:
                self._warned = True
                logger.exception("recording metric %s failed (further failures not logged)",
                                 method.__name__)
    return wrapper


class Metrics:
    """The metric names of issue 4, exactly."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._warned = False
        r = self.registry
        # CPU, memory, open files and start time of this process (process_*; Linux only, empty
        # elsewhere) and the Python version (python_info): what the default registry would have.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.request_duration = Histogram(
            "uda_request_duration_seconds", "Time from receiving a request to its answer",
            ["task"], registry=r, buckets=_LATENCY_BUCKETS)
        self.requests = Counter("uda_requests", "Answered requests by task and HTTP status",
                                ["task", "code"], registry=r)
        self.batch_size = Histogram("uda_batch_size", "Images per forward pass", registry=r,
                                    buckets=_BATCH_BUCKETS)
        self.swap_duration = Histogram("uda_swap_duration_seconds",
                                       "Restore of the previous residual plus apply of the next",
                                       registry=r, buckets=_SWAP_BUCKETS)
        self.load_duration = Histogram("uda_residual_load_duration_seconds",
                                       "Fetch, validation and device upload of one residual",
                                       registry=r, buckets=_LATENCY_BUCKETS)
        self.cache_hits = Counter("uda_residual_cache_hits", "Batches whose residual was resident",
                                  registry=r)
        self.cache_misses = Counter("uda_residual_cache_misses",
                                    "Residual loads started because a task was not resident",
                                    registry=r)
        self.cache_evictions = Counter("uda_residual_cache_evictions",
                                       "Residuals dropped from the cache", registry=r)
        self.cache_bytes = Gauge("uda_residual_cache_bytes", "Bytes of resident residuals",
                                 registry=r)
        self.cache_entries = Gauge("uda_residual_cache_entries", "Resident residuals", registry=r)
        self.task_resident = Gauge("uda_task_resident", "1 when the task's residual is resident",
                                   ["task"], registry=r)
        self.task_precision_info = Gauge(
            "uda_task_precision", "1 for the precision (fp32, bf16) a loaded task is served in",
            ["task", "precision"], registry=r)
        # Which version each replica serves: during a rollout of a task, replicas may disagree.
        self.task_version = Gauge("uda_task_version", "Version of the task's residual this server serves",
                                  ["task"], registry=r)
        self.queue_depth = Gauge("uda_queue_depth", "Requests waiting over all tasks", registry=r)
        self.tasks_published = Gauge("uda_tasks_published", "Tasks in the store the server knows",
                                     registry=r)
        self.refused = Counter("uda_residuals_refused", "Residuals refused, by reason",
                               ["reason"], registry=r)
        # Series exist at 0 from the start, so increase() in an alert sees the first refusal.
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)
        self.store_up = Gauge("uda_store_up", "1 when the residual store answered the last check",
                              registry=r)
        self.queue_capacity = Gauge("uda_queue_capacity", "The --max-queue bound", registry=r)
        self.store_tasks_missing = Gauge(
            "uda_store_tasks_missing",
            "Served tasks the store lost (restarted empty or wiped), served from the cache",
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @_safe
    def observe_request(self, task: str, code: int, seconds: float) -> None:
        self.requests.labels(task=task, code=str(code)).inc()
        self.request_duration.labels(task=task).observe(seconds)

    @_safe
    def observe_batch(self, size: int, swap_s: float | None) -> None:
        self.batch_size.observe(size)
        if swap_s is not None:
            self.swap_duration.observe(swap_s)

    @_safe
    def observe_load(self, seconds: float) -> None:
        self.load_duration.observe(seconds)

    @_safe
    def cache_hit(self) -> None:
        self.cache_hits.inc()

    @_safe
    def cache_miss(self) -> None:
        self.cache_misses.inc()

    @_safe
    def cache_state(self, nbytes: int, entries: int) -> None:
        self.cache_bytes.set(nbytes)
        self.cache_entries.set(entries)

    @_safe
    def evicted(self) -> None:
        self.cache_evictions.inc()

    @_safe
    def resident(self, task: str, is_resident: bool) -> None:
        self.task_resident.labels(task=task).set(1 if is_resident else 0)

    @_safe
    def task_precision(self, task: str, precision: str) -> None:
        self.task_precision_info.labels(task=task, precision=precision).set(1)

    @_safe
    def served_version(self, task: str, version: int) -> None:
        self.task_version.labels(task=task).set(version)

    @_safe
    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    @_safe
    def published(self, count: int) -> None:
        self.tasks_published.set(count)

    @_safe
    def store_reachable(self, up: bool) -> None:
        self.store_up.set(1 if up else 0)

    @_safe
    def tasks_missing(self, count: int) -> None:
        self.store_tasks_missing.set(count)

    @_safe
    def capacity(self, max_queue: int) -> None:
        self.queue_capacity.set(max_queue)

    @_safe
    def refusal(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()

    @_safe
    def forget_task(self, task: str) -> None:
        """A deleted task leaves the per-task gauge (counters keep their history)."""
        for gauge in (self.task_resident, self.task_version):
            try:
                gauge.remove(task)
            except KeyError:
                pass
        for precision in PRECISIONS:
            try:
                self.task_precision_info.remove(task, precision)
            except KeyError:
                pass
