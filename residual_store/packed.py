"""A flat residual packed for residence in a cache: 6 bytes per entry instead of 8.

A server holds hundreds of residuals and applies one at a time, so the resident form trades a
decode at each task switch (about 1 ms for 431 k entries on a 2-core CPU, microseconds on a
GPU) for a quarter less memory per task. The flat positions are sorted, so the entries of each
2**16-weight block form one run: the block's start is stored once per block (as the jump from
the previous block's start, at the run's first entry) and each entry keeps only its 16 low bits,
minus 2**15 so they fit an int16; the first jump carries the 2**15 back.

Semantics: high = zeros(nnz); high[firsts] = jumps; index = cumsum(high) + low.
A cumulative sum rather than repeat_interleave: on a CPU, repeat_interleave parallelises even
tiny inputs, and waking a second thread on a busy machine costs milliseconds.
"""
from __future__ import annotations

import dataclasses

import torch

from residual_store.residual import FlatResidual

BLOCK_BITS = 16
_LOW_MASK = (1 << BLOCK_BITS) - 1
_BIAS = 1 << (BLOCK_BITS - 1)  # low bits are stored minus this: 0..65535 -> int16's range


@dataclasses.dataclass(frozen=True)
class PackedResidual:
    """`FlatResidual` with its index stored as block starts, run lengths and low bits."""

    firsts: torch.Tensor  # int64, entry number where each non-empty block's run begins
    jumps: torch.Tensor  # int64, that block's start minus the previous one's (+2**15 on the first)
    low: torch.Tensor  # int16, each entry's position inside its block minus 2**15
    values: torch.Tensor  # deltas, as in the FlatResidual

    @classmethod
    def pack(cls, flat: FlatResidual) -> PackedResidual:
        """Pack a residual whose index is strictly increasing (ValueError otherwise)."""
        index = flat.index.long()
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("a packed residual needs a strictly increasing flat index")
        blocks, counts = torch.unique_consecutive(index >> BLOCK_BITS, return_counts=True)
        starts = blocks << BLOCK_BITS
        firsts = torch.cumsum(counts, 0) - counts
        jumps = torch.diff(starts, prepend=starts.new_zeros(1))
        if jumps.numel():
            jumps[0] += _BIAS  # carried by the cumulative sum into every entry
        low = ((index & _LOW_MASK) - _BIAS).to(torch.int16)
        return cls(firsts, jumps, low, flat.values)

    def unpack(self) -> FlatResidual:
        """The exact int64 flat index and the values, on this residual's device."""
        index = torch.zeros(self.nnz, dtype=torch.int64, device=self.low.device)
        index[self.firsts] = self.jumps
        index.cumsum_(0)
        index.add_(self.low)  # int16 widened on the fly, no temporary
        return FlatResidual(index, self.values)

    @property
    def nnz(self) -> int:
        return int(self.low.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PackedResidual:
        return PackedResidual(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> PackedResidual:
        return PackedResidual(*(t.pin_memory() for t in self._tensors()))

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell CUDA's caching allocator that `stream` uses these tensors (see ResidualLoader)."""
        for t in self._tensors():
            t.record_stream(stream)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.firsts, self.jumps, self.low, self.values
