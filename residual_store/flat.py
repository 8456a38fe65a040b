"""The image encoder's parameters as views into ONE flat contiguous buffer.

With every parameter a view into `FlatParams.buffer`, a residual is one (flat index, value)
pair and a swap is one gather, one index_add and one index_copy, instead of a Python loop over
~150 tensors. Optimisers and autograd keep working: each `nn.Parameter` still exists, only its
storage is shared.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import sys
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes of an x86-64/arm64 transparent huge page
_MADV_HUGEPAGE = 14  # linux/mman.h
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclasses.dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives inside the flat buffer."""

    name: str  # name inside the image encoder, e.g. "transformer.resblocks.0.attn.in_proj_weight"
    offset: int  # first flat position
    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of an image encoder's parameters (registration order)."""

    slots: tuple[ParamSlot, ...]

    @classmethod
    def of(cls, encoder: nn.Module) -> ParamLayout:
        slots, offset = [], 0
        for name, p in encoder.named_parameters():
            slots.append(ParamSlot(name, offset, p.numel(), tuple(p.shape), p.dtype))
            offset += p.numel()
        return cls(tuple(slots))

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    def __getitem__(self, name: str) -> ParamSlot:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def _by_name(self) -> dict[str, ParamSlot]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {s.name: s for s in self.slots}
            object.__setattr__(self, "_index", cached)
        return cached


def huge_pages_available() -> bool:
    """Linux with transparent huge pages not switched off ("always" or "madvise" mode)."""
    if sys.platform != "linux":
        return False
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def huge_page_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `numel` elements in memory advised for transparent huge
    pages (2 MiB-aligned, madvise(MADV_HUGEPAGE) before any page is touched).

    A forward pass streams every weight and a swap writes scattered ones: with 4 KiB pages
    both miss the TLB on almost every page of a 330 MiB encoder (a ViT-B-16 forward ran 8%
    faster on 2 MiB pages on the development machine). Raises OSError if madvise fails.
    """
    size = dtype.itemsize
    raw = torch.empty(numel + 2 * HUGE_PAGE // size, dtype=dtype)  # fresh: no page touched yet
    skip = (-raw.data_ptr() % HUGE_PAGE) // size
    buffer = raw[skip:skip + numel]  # the view keeps `raw`'s storage alive
    length = -(-numel * size // HUGE_PAGE) * HUGE_PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(length), _MADV_HUGEPAGE) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"madvise(MADV_HUGEPAGE) failed: errno {errno}")
    return buffer


class FlatParams:
    """Rebinds every parameter of `encoder` to a view of one contiguous buffer.

    Build it after moving the encoder to its device and dtype: `.to()` allocates new storage
    and would silently detach the parameters from the buffer (`check()` detects that).
    On a CPU under Linux the buffer sits on transparent huge pages when it spans at least one
    (`huge_pages=None`); True insists (OSError where that fails), False never asks.
    """

    def __init__(self, encoder: nn.Module, huge_pages: bool | None = None):
        params = list(encoder.named_parameters())
        if not params:
            raise ValueError("image encoder has no parameters")
        dtypes = {p.dtype for _, p in params}
        devices = {p.device for _, p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"image encoder mixes dtypes {dtypes} or devices {devices}: "
                             "cast it to one dtype on one device before flattening")
        self.layout = ParamLayout.of(encoder)
        self.encoder = encoder
        self.buffer, self.huge_pages = self._allocate(self.layout.numel, dtypes.pop(), devices.pop(),
                                                      huge_pages)
        with torch.no_grad():
            for (_, p), slot in zip(params, self.layout.slots):
                view = self.buffer[slot.offset:slot.offset + slot.numel]
                view.copy_(p.reshape(-1))
                p.data = view.view(slot.shape)

    @staticmethod
    def _allocate(numel: int, dtype: torch.dtype, device: torch.device,
                  huge_pages: bool | None) -> tuple[torch.Tensor, bool]:
        """(buffer, whether it is advised for huge pages)."""
        asked = huge_pages is not None
        if not asked:
            big = numel * dtype.itemsize >= HUGE_PAGE
            huge_pages = device.type == "cpu" and big and huge_pages_available()
        if huge_pages:
            if device.type != "cpu":
                raise ValueError(f"huge pages apply to CPU buffers, not {device}")
            try:
                return huge_page_buffer(numel, dtype), True
            except OSError as e:
                if asked:
                    raise
                logger.info("flat buffer on normal pages: %s", e)  # only slower, still correct
        return torch.empty(numel, dtype=dtype, device=device), False

    def check(self) -> None:
        """Raise if a parameter no longer shares the buffer's storage (e.g. after `.to()`)."""
        base = self.buffer.untyped_storage().data_ptr()
        for (name, p) in self.encoder.named_parameters():
            if p.untyped_storage().data_ptr() != base:
                raise RuntimeError(f"parameter {name} was detached from the flat buffer; "
                                   "rebuild FlatParams after moving the encoder")

    def flat_index(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Flat positions of `local` (positions inside parameter `name`)."""
        return local.to(torch.int64) + self.layout[name].offset
