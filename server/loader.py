"""From a stored blob to a residual ready on the device, refusing what does not fit the base.

Runs in the cache's background threads, never on the model thread. On CUDA the deltas are
staged in pinned host memory and copied on a side stream, so the upload overlaps the model
thread's forward passes; the host copies of recently evicted residuals stay in a small pinned
tier (`HostTier`) so a reload after eviction skips the store and the parsing.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict

import torch

from residual_store import PackedResidual, Residual, check_compatible, from_bytes
from residual_store.errors import IntegrityError, ResidualFormatError, ResidualMismatch
from server.cache import CachedResidual, cached_nbytes
from server.precision_guard import PrecisionRefused, check_served_precision

logger = logging.getLogger(__name__)


def refusal_reason(exc: BaseException) -> str | None:
    """The `reason` label of uda_residuals_refused_total for an error, None if not a refusal."""
    if isinstance(exc, ResidualMismatch):
        return "base_mismatch"
    if isinstance(exc, ResidualFormatError):
        return "invalid_format"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, PrecisionRefused):
        return "precision"
    return None


class HostTier:
    """Pinned host copies of residuals (CUDA only), LRU-bounded in bytes."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[tuple[str, str], tuple[Residual, PackedResidual]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key, residual: Residual, flat: PackedResidual) -> None:
        with self._lock:
            if key in self._items or flat.nbytes > self.capacity_bytes:
                return
            self._items[key] = (residual, flat)
            self._bytes += flat.nbytes
            while self._bytes > self.capacity_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old.nbytes


class ResidualLoader:
    """`(task, version, sha256) -> CachedResidual`: fetch, verify, validate, upload."""

    def __init__(self, store, engine, metrics=None, host_tier_bytes: int = 0,
                 max_precision_drop: float = 0.5):
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.max_precision_drop = max_precision_drop  # points; see server/precision_guard.py
        cuda = engine.device is not None and engine.device.type == "cuda"
        self.host_tier = HostTier(host_tier_bytes) if cuda and host_tier_bytes > 0 else None
        self._stream = torch.cuda.Stream(engine.device) if cuda else None

    def __call__(self, task: str, version: int, sha256: str) -> CachedResidual:
        with self._counting_refusals():
            return self._load(task, version, sha256)

    def verify(self, task: str, version: int, sha256: str) -> None:
        """Fetch and validate (task, version) without making it resident; refusals are counted
        like a load's. The catalog checks a new version of a task that is not resident this way,
        so a bad file never replaces a good version that is merely cold."""
        with self._counting_refusals():
            self.fetch(task, version, sha256)

    @contextlib.contextmanager
    def _counting_refusals(self):
        """Count a residual's refusal (uda_residuals_refused_total{reason}) and re-raise it."""
        try:
            yield
        except Exception as e:
            reason = refusal_reason(e)
            if reason is not None and self.metrics is not None:
                self.metrics.refusal(reason)
            raise

    def _load(self, task: str, version: int, sha256: str) -> CachedResidual:
        key = (task, sha256)
        staged = self.host_tier.get(key) if self.host_tier is not None else None
        if staged is None:
            residual = self.fetch(task, version, sha256)
            host_flat = self.engine.resident_form(residual)  # fp32 deltas or bf16 targets
            if self._stream is not None:
                host_flat = host_flat.pin_memory()
                if self.host_tier is not None:  # no host tier when its budget is 0
                    self.host_tier.put(key, residual, host_flat)
        else:
            residual, host_flat = staged
        flat, head = self._upload(residual, host_flat)
        nbytes = cached_nbytes(flat, head)
        if self.metrics is not None:
            self.metrics.task_precision(task, self.engine.precision)
        return CachedResidual(task=task, sha256=sha256, version=version, flat=flat, head=head,
                              classes=tuple(residual.classes), nnz=residual.nnz, dsp=residual.dsp,
                              nbytes=nbytes)

    def fetch(self, task: str, version: int, sha256: str) -> Residual:
        """The validated residual of exactly (task, version), checked against the base."""
        _, blob = self.store.get(task, version)
        actual = hashlib.sha256(blob).hexdigest()
        if actual != sha256:
            raise IntegrityError(f"{task} v{version}: blob sha256 {actual[:12]} differs from the "
                                 f"announced {sha256[:12]}")
        residual = from_bytes(blob)
        check_compatible(residual, self.engine.residual_layout, self.engine.fingerprint, self.engine.embed_dim,
                         activation=self.engine.activation)
        check_served_precision(residual, self.engine.precision, self.max_precision_drop)
        return residual

    def _upload(self, residual: Residual, host_flat: PackedResidual):
        device = self.engine.device
        head = residual.build_head()
        if self._stream is None:
            return host_flat.to(device), head.to(device)
        # A side stream so the copy overlaps the model thread's kernels; synchronise it before
        # the entry becomes visible, since the model thread uses the default stream.
        with torch.cuda.stream(self._stream):
            flat = host_flat.to(device, non_blocking=True)
            head = head.to(device, non_blocking=True)
        self._stream.synchronize()
        # Allocated on the side stream, used by the model thread's default stream: without this,
        # once the entry is evicted the allocator could hand its memory to the next upload while
        # a swap queued on the default stream still reads it.
        model_stream = torch.cuda.default_stream(device)
        flat.record_stream(model_stream)
        for t in (*head.parameters(), *head.buffers()):
            t.record_stream(model_stream)
        return flat, head
