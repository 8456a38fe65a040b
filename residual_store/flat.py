"""The image encoder's parameters as views into ONE flat contiguous buffer.

With every parameter a view into `FlatParams.buffer`, a residual is one (flat index, value)
pair and a swap is one gather, one index_add and one index_copy, instead of a Python loop over
~150 tensors. Optimisers and autograd keep working: each `nn.Parameter` still exists, only its
storage is shared.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


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


class FlatParams:
    """Rebinds every parameter of `encoder` to a view of one contiguous buffer.

    Build it after moving the encoder to its device and dtype: `.to()` allocates new storage
    and would silently detach the parameters from the buffer (`check()` detects that).
    """

    def __init__(self, encoder: nn.Module):
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
        self.buffer = torch.empty(self.layout.numel, dtype=dtypes.pop(), device=devices.pop())
        with torch.no_grad():
            for (_, p), slot in zip(params, self.layout.slots):
                view = self.buffer[slot.offset:slot.offset + slot.numel]
                view.copy_(p.reshape(-1))
                p.data = view.view(slot.shape)

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
