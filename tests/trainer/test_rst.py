"""RST: after the mask step every stored |w - w0| is > tau and every other weight is w0 exactly."""
from __future__ import annotations

import pytest
import torch

from residual_store import BaseSpec, FlatParams, extract
from trainer.rst import ResidualSparsifier

TAU = 1e-6


@pytest.fixture(scope="module")
def flat():
    return FlatParams(BaseSpec("uda-tiny-vit").build().visual)


def test_mask_step_resets_small_deltas_exactly(flat):
    rst = ResidualSparsifier(flat, TAU)
    w0 = rst.w0.clone()
    g = torch.Generator().manual_seed(0)
    # deltas around tau: some below, some above, some exactly tau, some zero
    delta = torch.randn(w0.numel(), generator=g, dtype=torch.float64) * 2 * TAU
    delta[::7] = TAU
    delta[::11] = 0
    with torch.no_grad():
        flat.buffer.copy_((w0.double() + delta).float())
    before = flat.buffer.clone()
    rst.step()
    w = flat.buffer
    moved = (before - w0).abs() > TAU
    assert torch.equal(w[moved], before[moved])  # kept weights untouched
    assert torch.equal(w[~moved], w0[~moved])  # the rest reset to w0 bit-exactly
    diff = (w - w0)[w != w0]
    assert diff.numel() == int(moved.sum()) > 0
    assert bool((diff.abs() > TAU).all())
    assert rst.nnz() == int(moved.sum())
    with torch.no_grad():
        flat.buffer.copy_(w0)


def test_training_steps_with_rst_leave_only_deltas_above_tau(flat):
    rst = ResidualSparsifier(flat, TAU)
    w0 = rst.w0.clone()
    opt = torch.optim.SGD(flat.encoder.parameters(), lr=3e-6, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=g)
        opt.zero_grad()
        flat.encoder(x).pow(2).mean().backward()
        opt.step()
        rst.step()
        diff = flat.buffer - w0
        nz = diff != 0
        assert bool((diff[nz].abs() > TAU).all())
    base = {s.name: w0[s.offset:s.offset + s.numel].view(s.shape) for s in flat.layout.slots}
    deltas = extract(base, dict(flat.encoder.named_parameters()))
    stored = torch.cat([v for _, v in deltas.values()])
    assert stored.numel() == rst.nnz() > 0
    assert bool((stored.abs() > TAU).all())
    with torch.no_grad():
        flat.buffer.copy_(w0)


def test_negative_tau_is_refused(flat):
    with pytest.raises(ValueError, match="tau"):
        ResidualSparsifier(flat, -1e-6)
