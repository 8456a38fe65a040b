"""The Trainer against METHOD.md's rules that the end-to-end tests cannot see: RST after every
optimiser step, frozen ResNet BatchNorm statistics, label smoothing, the optimiser and the
family defaults; and Ctrl-C, which must leave a checkpoint that resumes exactly."""
from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

MODELS = ["uda-tiny-vit", "uda-tiny-rn"]


def fixed_batches(trainer, seed: int = 0):
    """One step's batches of random images: (source images, labels), (target images,)."""
    g = torch.Generator().manual_seed(seed)
    size, n = trainer.input_size, trainer.cfg.batch_size
    source = (torch.randn(n, 3, size, size, generator=g),
              torch.randint(0, len(trainer.class_names), (n,), generator=g))
    return source, (torch.randn(n, 3, size, size, generator=g),)


@pytest.mark.parametrize("rst", [True, False])
def test_rst_runs_after_every_optimiser_step(make_trainer, tmp_path, rst):
    """Before each step's forward (so after the previous step) and in the checkpoint, every
    encoder weight that differs from w0 differs by more than tau. Without --rst the same run
    has changes of at most tau, so the check can tell."""
    tau = 1e-5  # at lr 1e-3 the first step moves a few dozen weights past it, the rest less
    trainer = make_trainer(tmp_path, rst=rst, tau=tau if rst else None, iters_per_epoch=4, stop_after=3)
    seen = []  # (weights changed, of which by at most tau), at the start of each step

    def count(delta: torch.Tensor) -> tuple[int, int]:
        changed = delta != 0
        return int(changed.sum()), int((changed & (delta.abs() <= tau)).sum())

    # on the network, which a step calls once (its encoder runs once per domain)
    trainer.net.register_forward_pre_hook(
        lambda module, args: seen.append(count(trainer.flat.buffer.detach() - trainer.w0)))
    trainer.train()
    state = torch.load(trainer.checkpoint_path, weights_only=True)
    assert state["step"] == 3 and len(seen) == 3 and seen[0] == (0, 0)
    after_each_step = seen[1:] + [count(state["encoder"] - trainer.w0.cpu())]
    assert all(changed > 0 for changed, _ in after_each_step)
    if rst:
        assert [small for _, small in after_each_step] == [0, 0, 0]
    else:
        assert all(small > 0 for _, small in after_each_step)


def test_resnet_batchnorm_keeps_its_statistics_and_trains_its_affine_parameters(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, model="uda-tiny-rn")
    bns = [m for m in trainer.net.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    stats = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in bns]
    affine = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in bns]
    modes = []
    trainer.net.visual.register_forward_pre_hook(lambda module, args: modes.append(
        [m.training for m in bns] + [trainer.net.head.training]))
    trainer.train()
    assert modes and all(mode == [False] * len(bns) + [True] for mode in modes)  # the head trains
    for m, (mean, var, tracked) in zip(bns, stats):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == tracked
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in bns)
    moved = [not torch.equal(m.weight, w) or not torch.equal(m.bias, b) for m, (w, b) in zip(bns, affine)]
    assert all(moved)


@pytest.mark.parametrize("model", MODELS)
def test_source_loss_uses_label_smoothing_01(make_trainer, tmp_path, model):
    trainer = make_trainer(tmp_path, model=model)
    with torch.no_grad():  # a confident head: near-uniform logits lose the same with or without
        trainer.net.head.fc.weight.normal_(generator=torch.Generator().manual_seed(1))
    (xs, ys), (xt,) = fixed_batches(trainer)
    trainer.net.train()
    with torch.no_grad():  # the step's forward: same weights, the source's batch statistics
        logits_s = trainer.net(xs)[0]
    smoothed = F.cross_entropy(logits_s, ys, label_smoothing=0.1).item()
    plain = F.cross_entropy(logits_s, ys).item()
    losses = trainer.train_step(((xs, ys), (xt,)))
    assert losses["cls"] == pytest.approx(smoothed, rel=1e-5)
    assert abs(plain - smoothed) > 0.1  # the check can tell smoothing from none


@pytest.mark.parametrize("model, family, lr, mult, tau", [
    ("uda-tiny-vit", "vit", 3e-6, 1000.0, 1e-6),
    ("uda-tiny-rn", "resnet", 3e-7, 10000.0, 1e-5),
])
def test_optimiser_and_family_defaults_without_flags(make_trainer, tmp_path, model, family, lr, mult, tau):
    """SGD, momentum 0.9, Nesterov, weight decay 5e-4; the encoder at lr and the head at lr * m;
    lr, m and tau from METHOD.md for the backbone's family when no flag sets them."""
    trainer = make_trainer(tmp_path, model=model, rst=True, lr=None, head_lr_mult=None)
    assert trainer.family == family
    assert (trainer.cfg.lr, trainer.cfg.head_lr_mult, trainer.cfg.tau) == (lr, mult, tau)
    assert trainer.sparsifier.tau == tau
    opt = trainer.optimizer
    assert type(opt) is torch.optim.SGD
    encoder, head = opt.param_groups
    assert [id(p) for p in encoder["params"]] == [id(p) for p in trainer.net.visual.parameters()]
    # the head's BatchNorm bias stays frozen at 0, as in the paper and the authors' code
    assert [id(p) for p in head["params"]] == [id(p) for name, p in trainer.net.head.named_parameters()
                                               if name != "bn.bias"]
    assert not trainer.net.head.bn.bias.requires_grad
    assert encoder["lr"] == pytest.approx(lr) and head["lr"] == pytest.approx(lr * mult)
    for group in (encoder, head):
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
        assert group["dampening"] == 0


def same_state(a, b) -> bool:
    return torch.equal(a.flat.buffer, b.flat.buffer) and all(
        torch.equal(v, b.net.head.state_dict()[k]) for k, v in a.net.head.state_dict().items())


@pytest.mark.parametrize("presses, checkpoint_step", [(1, 2), (2, 1)])
def test_ctrl_c_leaves_a_checkpoint_at_a_step_boundary(make_trainer, tmp_path, presses, checkpoint_step):
    """SIGINT right after the second step's optimizer.step(), before its step counter moves (the
    spot where saving then would store step 1 with step 2's weights). One Ctrl-C: the step
    finishes and is checkpointed. Two: training stops at once and the checkpoint of step 1 (the
    last one at a boundary) stays. Either way --resume ends exactly like an uninterrupted run."""
    flags = dict(rst=True, iters_per_epoch=4, checkpoint_every=1)
    whole = make_trainer(tmp_path / "whole", **flags)
    whole.train()

    parts = make_trainer(tmp_path / "parts", **flags)

    def ctrl_c(optimizer, args, kwargs):
        if parts.step == 1:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)

    parts.optimizer.register_step_post_hook(ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        parts.train()
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert parts.checkpoint_step == checkpoint_step
    assert torch.load(parts.checkpoint_path, weights_only=True)["step"] == checkpoint_step

    resumed = make_trainer(tmp_path / "parts", **flags, resume=True)
    assert resumed.step == checkpoint_step
    resumed.train()
    assert resumed.step == whole.step == 4 and same_state(resumed, whole)
