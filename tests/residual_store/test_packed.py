"""The packed resident form: unpacking gives back exactly the flat index it was packed from,
across block boundaries and int64 positions, in 6 bytes per entry; swapping with it leaves the
same weights as swapping with the plain flat residual."""
from __future__ import annotations

import pytest
import torch
from helpers_residual import build_tiny, random_tuned, residual_for
from hypothesis import given, settings
from hypothesis import strategies as st

from residual_store import FlatResidual, PackedResidual, apply_residual, restore_residual
from residual_store.packed import BLOCK_BITS

BLOCK = 1 << BLOCK_BITS


def flat(positions) -> FlatResidual:
    index = torch.tensor(sorted(set(positions)), dtype=torch.int64)
    return FlatResidual(index, torch.arange(index.numel(), dtype=torch.float32) * 1e-6)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 2**40), max_size=300))
def test_unpack_gives_back_the_exact_index(positions):
    original = flat(positions)
    unpacked = PackedResidual.pack(original).unpack()
    assert unpacked.index.dtype == torch.int64
    assert torch.equal(unpacked.index, original.index)
    assert unpacked.values is original.values


@pytest.mark.parametrize("positions", [
    [0], [BLOCK - 1], [BLOCK], [BLOCK - 1, BLOCK], [0, BLOCK - 1, BLOCK, 2 * BLOCK - 1, 2 * BLOCK],
    list(range(BLOCK - 3, BLOCK + 3)),  # a run across a boundary: low bits wrap, blocks split
    [5, 40 * BLOCK + 7, 2**33 + 1],  # empty blocks in between, and past int32
])
def test_block_boundaries(positions):
    assert PackedResidual.pack(flat(positions)).unpack().index.tolist() == sorted(positions)


def test_empty_residual_packs_and_unpacks():
    packed = PackedResidual.pack(FlatResidual(torch.zeros(0, dtype=torch.int64), torch.zeros(0)))
    assert packed.nnz == 0 and packed.nbytes == 0
    assert packed.unpack().index.numel() == 0


@pytest.mark.parametrize("index", [[3, 3], [4, 2], [1, 7, 7, 9]])
def test_only_a_strictly_increasing_index_packs(index):
    with pytest.raises(ValueError, match="strictly increasing"):
        PackedResidual.pack(FlatResidual(torch.tensor(index), torch.zeros(len(index))))


def test_six_bytes_per_entry_plus_sixteen_per_block():
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(50 * BLOCK, generator=g)[:20_000].sort().values
    packed = PackedResidual.pack(FlatResidual(index, torch.randn(20_000, generator=g)))
    blocks = int(packed.firsts.numel())
    assert blocks == len({int(i) >> BLOCK_BITS for i in index})
    assert packed.nbytes == 20_000 * (2 + 4) + blocks * (8 + 8)
    assert packed.low.dtype == torch.int16


def test_swapping_with_the_packed_form_gives_the_same_weights():
    tiny = build_tiny("uda-tiny-vit")
    tuned = random_tuned(tiny.base_state, [s.name for s in tiny.layout.slots], 0.3, seed=4)
    plain = residual_for(tiny, tuned).to_flat(tiny.layout)
    buffer = tiny.flat.buffer
    saved = apply_residual(buffer, plain)
    expected = buffer.clone()
    restore_residual(buffer, plain.index, saved)
    unpacked = PackedResidual.pack(plain).unpack()
    saved = apply_residual(buffer, unpacked)
    assert torch.equal(buffer.view(torch.int32), expected.view(torch.int32))
    restore_residual(buffer, unpacked.index, saved)
    assert torch.equal(buffer.view(torch.int32), tiny.base_buffer.view(torch.int32))
