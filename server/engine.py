"""The swap engine: one frozen base on the device, residuals applied onto its flat buffer.

Only the engine's model thread calls `run`; `fingerprint_now` (tests, admin) takes the same
lock, so it never reads weights halfway through a swap. The applied residual stays applied
between batches of the same (task, sha256), so a stream of one task costs no swaps; switching
tasks restores the originals exactly (copy back, no subtraction) before applying the next
residual.

With `precision="bf16"` the resident encoder weights are bf16 (residual_store/precision.py):
the cache holds each residual's bf16 target values, a swap writes them and restores the saved
bf16 originals, and the head runs in fp32 on fp32 features. `fingerprint` stays the fp32 base's
(what residuals name); `resident_fingerprint` is the one of the weights as served.

`replica()` gives a second engine over its own copy of the base, for a second model thread
(`--streams`): each engine has its own weights to swap, so threads never share a swap.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Hashable

import torch
from torch import nn

from residual_store import BaseSpec, FlatParams, FlatResidual, PackedResidual, embed_dim, fingerprint, input_size
from residual_store.base import model_activation
from residual_store.numerics import set_fp32_precision
from residual_store.precision import ServedWeights, check_precision, encode, served_weights
from residual_store.residual import Residual
from residual_store.swap import apply_residual, apply_targets, restore_residual

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda:0 when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from residual_store.errors import BaseModelError

        raise BaseModelError(f"--device {device} asked for CUDA, but torch sees no GPU here: "
                             "use --device cpu or auto")
    return dev


@dataclasses.dataclass
class _Applied:
    key: Hashable  # (task, sha256) of the residual now in the weights
    index: torch.Tensor  # its flat positions, int64 (unpacked once, reused by the restore)
    saved: torch.Tensor  # the base values at those positions, copied back on restore


@dataclasses.dataclass(frozen=True)
class RunTiming:
    swapped: bool  # False when the residual was applied already (same task as the last batch)
    swap_s: float  # restore of the previous residual + apply of this one (0 when not swapped)
    model_s: float  # forward pass of encoder and head


class SwapEngine:
    """Builds the base once (`setup`), then runs batches with a residual applied."""

    def __init__(self, spec: BaseSpec, device: str = "auto", precision: str = "fp32"):
        self.spec = spec
        self.requested_device = device
        self.precision = precision
        self.dtype = check_precision(precision)
        self.weights: ServedWeights | None = None
        self.device: torch.device | None = None
        self.model: nn.Module | None = None
        self.flat: FlatParams | None = None
        self.fingerprint: str | None = None  # of the fp32 base as built; residuals must match it
        self.resident_fingerprint: str | None = None  # of the weights as served (bf16 or fp32)
        self.activation: str | None = None  # "quick_gelu" or "gelu", of the base as built
        self.embed_dim: int | None = None
        self.input_size: int | None = None
        self._applied: _Applied | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.flat is not None

    def setup(self) -> None:
        """Build the base on the device and flatten its image encoder (heavy: seconds)."""
        self.device = resolve_device(self.requested_device)
        # Exact fp32 for the whole serving process: PyTorch's default lets cuDNN convolutions
        # run in TF32, which rounds residual deltas away (residual_store/numerics.py).
        set_fp32_precision("ieee")
        model = self.spec.build(self.device)
        model.requires_grad_(False)
        visual = model.visual
        self.fingerprint = fingerprint(visual)
        # Flatten after the move to the device: .to() would detach the parameters again.
        self.weights = served_weights(visual, self.precision)
        flat = self.weights.flat
        self.resident_fingerprint = fingerprint(visual)
        self.embed_dim = embed_dim(model)
        self.input_size = input_size(model)
        self.activation = model_activation(model)  # before the text tower goes: RN50's has it
        # Only the image encoder is served; dropping the text tower frees its memory.
        for name in ("transformer", "token_embedding", "ln_final", "text"):
            if hasattr(model, name):
                setattr(model, name, None)
        self.model, self.flat = model, flat
        logger.info("base %s/%s with %s on %s in %s, fingerprint %s, %d encoder weights",
                    self.spec.model, self.spec.pretrained_label, self.activation, self.device,
                    self.precision, self.fingerprint[:12], flat.layout.numel)

    def replica(self) -> SwapEngine:
        """A set-up engine over a deep copy of this base: the same weights bit for bit (checked
        by fingerprint), its own flat buffer, its own applied residual and lock."""
        if not self.ready:
            raise RuntimeError("setup() the engine before making replicas of it")
        with self._lock:
            self._restore_locked()
            model = copy.deepcopy(self.model)
        twin = SwapEngine(self.spec, self.requested_device, self.precision)
        twin.device, twin.embed_dim, twin.input_size = self.device, self.embed_dim, self.input_size
        twin.activation, twin.fingerprint = self.activation, self.fingerprint
        twin.flat = FlatParams(model.visual)  # the copy's parameters, rebound to a fresh buffer
        # The fp32 master is only read (at load time): the replicas share it.
        twin.weights = ServedWeights(twin.flat, self.weights.master, self.dtype, self.weights.layout)
        twin.model = model
        twin.resident_fingerprint = fingerprint(model.visual)
        if twin.resident_fingerprint != self.resident_fingerprint:
            raise RuntimeError(f"replica's base fingerprint {twin.resident_fingerprint[:12]} differs "
                               f"from {self.resident_fingerprint[:12]}: the copy did not reproduce "
                               "the weights")
        return twin

    @property
    def layout(self):
        return self.flat.layout

    @property
    def residual_layout(self):
        """The fp32 base's layout, which residuals are validated against (= layout in fp32)."""
        return self.weights.layout

    def resident_form(self, residual: Residual) -> PackedResidual:
        """What the cache keeps of `residual` for this engine (on the host): its flat deltas in
        fp32, or its bf16 target values; packed."""
        return PackedResidual.pack(self.weights.resident(residual.to_flat(self.residual_layout)))

    @property
    def applied_key(self) -> Hashable | None:
        applied = self._applied
        return applied.key if applied else None

    def run(self, key: Hashable, residual: PackedResidual | FlatResidual, head: nn.Module,
            batch: torch.Tensor) -> tuple[torch.Tensor, RunTiming]:
        """Logits of `batch` under base + residual: `head(visual(x))`, on the CPU.

        Semantics: if key differs from the applied one: w[idx_old] = saved_old;
        idx, values = unpack(residual); saved = w[idx]; w[idx] += values (fp32), or
        w[idx] = values (bf16: `resident_form` made them targets).
        Then logits = head(float(visual(x))).
        """
        with self._lock:
            t0 = time.perf_counter()
            swapped = self.applied_key != key
            if swapped:
                self._restore_locked()
                self._apply_locked(key, residual)
            t1 = time.perf_counter()
            with torch.inference_mode():
                features = encode(self.model.visual, batch.to(self.device, non_blocking=True), self.dtype)
                logits = head(features)
                logits = logits.float().cpu()
            t2 = time.perf_counter()
        return logits, RunTiming(swapped, t1 - t0 if swapped else 0.0, t2 - t1)

    def restore(self) -> None:
        """Put the exact base weights back (idle, shutdown, before a fingerprint check)."""
        with self._lock:
            self._restore_locked()

    def fingerprint_now(self) -> str:
        """sha256 of the base weights as they are now, with any applied residual removed first.

        Equals `self.resident_fingerprint` as long as every swap restored exactly.
        """
        with self._lock:
            self._restore_locked()
            return fingerprint(self.model.visual)

    def _apply_locked(self, key: Hashable, residual: PackedResidual | FlatResidual) -> None:
        flat = residual.unpack()  # int64 index, kept for the restore: unpacked once per switch
        with torch.no_grad():
            if self.weights.exact:
                saved = apply_residual(self.flat.buffer, flat)
            else:
                saved = apply_targets(self.flat.buffer, flat)
        self._applied = _Applied(key, flat.index, saved)

    def _restore_locked(self) -> None:
        applied, self._applied = self._applied, None
        if applied is not None:
            with torch.no_grad():
                restore_residual(self.flat.buffer, applied.index, applied.saved)

