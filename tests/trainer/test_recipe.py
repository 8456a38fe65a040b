"""The paper's recipe (issue 17): presets and where each setting came from, per-domain forward
passes, the augmentation flags, the ablation switches, evaluation during training, the report,
the plots and progress lines off a terminal. Tiny models, a few steps each."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer.test_train_cli import log_lines
from trainer import cli, data, presets
from trainer.cmkd import cmkd_loss, trade_off
from trainer.config import TrainConfig, default_workers
from trainer.progress import ProgressLog


def dry_run_plan(capsys, train, tmp_path, *flags) -> dict:
    assert train(tmp_path / "run", "--dry-run", *flags) == 0
    out = capsys.readouterr().out
    return json.loads(out[: out.rindex("}") + 1])


# -- presets and provenance --------------------------------------------------------------------

def test_preset_fills_what_no_flag_sets_and_says_where_each_setting_came_from(train, tmp_path, capsys):
    # FAST (conftest) names --epochs 1 --iters-per-epoch 3 --batch-size 4 --lr 1e-3 ...
    plan = dry_run_plan(capsys, train, tmp_path, "--preset", "digits")
    s = plan["settings"]
    assert s["hflip"] == {"value": False, "from": "preset digits"}
    assert s["crop"] == {"value": "random-resized", "from": "preset digits"}
    assert s["crop_scale"] == {"value": [0.75, 1.2], "from": "preset digits"}
    assert s["prompt"] == {"value": presets.DIGITS_PROMPT, "from": "preset digits"}
    assert s["lambda1"]["from"] == "preset digits" and s["fixmatch_weight"]["from"] == "preset digits"
    assert s["batch_size"] == {"value": 4, "from": "flag"}  # an explicit flag wins
    assert s["lr"] == {"value": 1e-3, "from": "flag"}
    assert s["gamma"] == {"value": 1.0, "from": "default"}
    # the authors' T_max of 10,000 in their 20,000-step run: half of this 3-step run
    assert s["ramp_max_steps"]["value"] == 2 and "scaled" in s["ramp_max_steps"]["from"]


def test_preset_learning_rates_follow_the_backbone_family(train, tmp_path, capsys, world):
    argv = ["--source", str(world["photo"]), "--target", str(world["sketch"]), "--pretrained",
            "random", "--workers", "0", "--device", "cpu", "--dry-run", "--workdir", str(tmp_path / "r")]
    for model, preset, lr, mult in (("uda-tiny-vit", "visda", 3e-7, 1000.0),
                                    ("uda-tiny-rn", "office-home", 3e-7, 10000.0)):
        assert cli.main([*argv, "--model", model, "--preset", preset]) == 0
        out = capsys.readouterr().out
        s = json.loads(out[: out.rindex("}") + 1])["settings"]
        family = "vit" if model == "uda-tiny-vit" else "resnet"
        assert s["lr"] == {"value": lr, "from": f"preset {preset} ({family})"}
        assert s["head_lr_mult"] == {"value": mult, "from": f"preset {preset} ({family})"}
        assert s["ramp_max_steps"] == {"value": presets.AUTHORS_RAMP_STEPS, "from": f"preset {preset}"}
        assert s["epochs"]["from"] == f"preset {preset}"


def test_every_preset_is_a_valid_configuration():
    for name, preset in presets.PRESETS.items():
        cfg = TrainConfig.from_settings({"preset": name, "source": Path("."), "target": Path(".")})
        cfg.validate()  # raises on any out-of-range value
        assert cfg.total_steps == preset.total_steps and cfg.ramp_steps == presets.AUTHORS_RAMP_STEPS
    assert presets.PRESETS["domainnet"].values["lambda1"] == 0.025
    assert presets.PRESETS["visda"].family_values["vit"]["lr"] == 3e-7


def test_unknown_preset_and_contradicting_flags_are_one_error(train, tmp_path, capsys):
    assert train(tmp_path / "run", "--preset", "mnist") == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err
    assert train(tmp_path / "run", "--crop-scale", "0.5", "1", "--alpha-value", "0.3") == 2
    err = capsys.readouterr().err
    assert "--crop-scale sets the area range of --crop random-resized" in err
    assert "--alpha-value is the trade-off of --alpha fixed" in err
    assert train(tmp_path / "run", "--crop", "random-resized", "--crop-scale", "1", "0.5") == 2
    assert "--crop-scale [1.0, 0.5] is out of range" in capsys.readouterr().err


def test_workers_default_is_never_more_than_the_cpus():
    assert TrainConfig().workers == default_workers() <= max(1, len(__import__("os").sched_getaffinity(0)))
    assert default_workers() <= 4


# -- per-domain forward passes -------------------------------------------------------------------

def batches(trainer, views: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, n = trainer.input_size, trainer.cfg.batch_size
    source = (torch.randn(n, 3, size, size, generator=g),
              torch.randint(0, len(trainer.class_names), (n,), generator=g))
    return source, tuple(torch.randn(n, 3, size, size, generator=g) for _ in range(views))


@pytest.mark.parametrize("fixmatch", [False, True])
def test_each_domain_goes_through_the_head_batchnorm_on_its_own(make_trainer, tmp_path, fixmatch):
    trainer = make_trainer(tmp_path, fixmatch=fixmatch)
    seen = []
    trainer.net.head.bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    trainer.train_step(batches(trainer, views=2 if fixmatch else 1))
    assert seen == [4] * (3 if fixmatch else 2)  # source, target weak (, target strong)


def test_a_batch_of_one_goes_through_together(make_trainer, tmp_path):
    """BatchNorm cannot normalise one image: with --batch-size 1 the domains share a pass."""
    trainer = make_trainer(tmp_path, batch_size=1)
    seen = []
    trainer.net.head.bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    trainer.train_step(batches(trainer))
    assert seen == [2]


def test_the_task_heads_batchnorm_bias_stays_zero(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, iters_per_epoch=3)
    trainer.train()
    assert torch.count_nonzero(trainer.net.head.bn.bias) == 0
    assert not torch.equal(trainer.net.head.bn.weight, torch.ones_like(trainer.net.head.bn.weight))


def test_source_logits_use_the_source_batch_statistics_alone(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path)
    (xs, ys), (xt,) = batches(trainer)
    xt = xt * 5 + 3  # a target whose statistics differ a lot from the source's
    trainer.net.train()
    with torch.no_grad():
        alone = trainer.net(xs)[0]
        joint = trainer.net(torch.cat([xs, xt]))[0][: len(xs)]
    assert not torch.allclose(alone, joint, atol=1e-3)  # the test can tell the two apart
    loss = trainer.train_step(((xs, ys), (xt,)))["cls"]
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(alone, ys, label_smoothing=0.1).item(),
                                 rel=1e-5)


# -- augmentation --------------------------------------------------------------------------------

def arrow(size: int = 40) -> Image.Image:
    """An image that a flip changes: bright on the left only."""
    im = np.zeros((size, size, 3), np.uint8)
    im[:, : size // 4] = 255
    return Image.fromarray(im)


def test_no_hflip_and_no_crop_give_the_resized_image_every_time():
    view = data.train_transform(32, hflip=False, crop="none")
    first = view(arrow())
    assert all(torch.equal(first, view(arrow())) for _ in range(20))
    assert first[0, :, 0].mean() > first[0, :, -1].mean()  # never mirrored


def test_hflip_flips_sometimes_and_random_resized_crop_uses_its_scale():
    flips = data.train_transform(32, hflip=True, crop="none")
    lefts = {bool(flips(arrow())[0, :, 0].mean() > 0) for _ in range(40)}
    assert lefts == {True, False}
    view = data.train_transform(32, hflip=False, crop="random-resized", crop_scale=(0.75, 1.2))
    rrc = [t for t in view.transforms if isinstance(t, data.transforms.RandomResizedCrop)]
    assert rrc and rrc[0].scale == (0.75, 1.2) and view(arrow()).shape == (3, 32, 32)


def test_the_strong_view_is_the_authors_and_reproducible_from_its_seed():
    strong = data.strong_transform(32, hflip=False)
    names = [type(t).__name__ for t in strong.transforms]
    assert "ColorJitter" in names and "RandAugment" in names and "RandomHorizontalFlip" not in names
    ra = strong.transforms[names.index("RandAugment")]
    assert ra.num_layers == 2 and all(op.magnitude == 10 and op.magnitude_std == 0.5 for op in ra.ops)
    assert all(op.hparams["translate_const"] == int(32 * 0.45) for op in ra.ops)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    state = random.getstate()
    with data.seeded_augmentation(7):
        a = strong(image)
    with data.seeded_augmentation(7):
        b = strong(image)
    with data.seeded_augmentation(8):
        c = strong(image)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random.getstate() == state  # the caller's stream is untouched


def test_no_hflip_trains_end_to_end_with_fixmatch(train, tmp_path):
    assert train(tmp_path / "run", "--no-hflip", "--crop", "random-resized", "--crop-scale", "0.75",
                 "1.2", "--fixmatch", "--fixmatch-weight", "0.25") == 0
    assert all("fixmatch" in line for line in log_lines(tmp_path / "run") if "eval" not in line)


# -- ablations -----------------------------------------------------------------------------------

def test_trade_off_modes():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    clip = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    p = logits.softmax(1)
    entropy = -(p * torch.log(p + 1e-5)).sum(1)
    assert torch.allclose(trade_off(logits, clip, "entropy"), torch.exp(-entropy))
    assert torch.equal(trade_off(logits, clip, "fixed", 0.3), torch.full((2,), 0.3))
    kl = trade_off(logits, clip, "kl")
    assert kl[1] == pytest.approx(1.0) and kl[0] < 0.1  # agreeing heads trust the task head
    with pytest.raises(ValueError, match="unknown trade-off"):
        trade_off(logits, clip, "mean")


def test_task_and_distill_weights_scale_their_terms_alone():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g),
            torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g), 0.4)
    full = cmkd_loss(*args)
    ablated = cmkd_loss(*args, task_weight=0.0, distill_weight=2.0)
    assert ablated["task"] == 0 and ablated["distill"] == pytest.approx(2 * full["distill"].item())
    assert ablated["reg"] == pytest.approx(full["reg"].item())
    fixed = cmkd_loss(*args, alpha_mode="fixed", alpha_value=1.0)
    assert fixed["distill"] == 0  # 1 - alpha = 0


# -- evaluation, report, plots -------------------------------------------------------------------

def test_eval_every_report_and_plots(train, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--rst", "--tau", "1e-5", "--eval-every", "1", "--iters-per-epoch", "4") == 0
    out = capsys.readouterr().out
    lines = log_lines(run)
    evals = [line for line in lines if "eval" in line]
    assert [line["step"] for line in evals] == [1, 2, 3, 4]
    assert all(0 <= line["eval"]["accuracy"] <= 1 for line in evals)
    assert all(isinstance(line["nnz"], int) for line in lines if "eval" not in line)
    report = json.loads((run / "report.json").read_text())
    best = report["paper_protocol"]
    assert best["accuracy"] == max(line["eval"]["accuracy"] for line in evals)
    assert best["evaluations"] == 4 and "target labels" in best["note"]
    assert "paper's protocol" in out and f"at step {best['best_step']}" in out
    m = report["metrics"]
    assert 0 <= m["mean_class_accuracy"] <= 1
    assert [c["class"] for c in report["per_class"]] == report["classes"]
    assert sum(map(sum, report["confusion"])) == m["target_images"] == 15
    correct = sum(report["confusion"][i][i] for i in range(3))
    assert correct / 15 == pytest.approx(m["target_accuracy"])
    # the last in-training evaluation saw the same weights as the export
    assert evals[-1]["eval"]["accuracy"] == pytest.approx(m["target_accuracy"])
    assert report["settings"]["eval_every"] == {"value": 1, "from": "flag"}
    for name in ("training.png", "confusion.png"):
        with Image.open(run / name) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_target_eval_is_evaluated_instead_of_the_target(train, tmp_path, world, world_copy):
    held_out = world_copy["sketch"]
    for path in sorted(held_out.rglob("*.png"))[::2]:
        path.unlink()  # a different, smaller labelled split
    n = len(list(held_out.rglob("*.png")))
    run = tmp_path / "run"
    assert train(run, "--target-eval", str(held_out), "--eval-every", "3") == 0
    report = json.loads((run / "report.json").read_text())
    assert report["metrics"]["target_images"] == n < 15
    assert report["evaluated_on"]["what"] == f"--target-eval {held_out}"


def test_target_eval_must_have_the_same_classes(train, tmp_path, world_copy, capsys):
    (world_copy["sketch"] / "hexagon").mkdir()
    arrow().save(world_copy["sketch"] / "hexagon" / "a.png")
    assert train(tmp_path / "run", "--target-eval", str(world_copy["sketch"])) == 2
    assert "only in target ['hexagon']" in capsys.readouterr().err


# -- progress off a terminal -----------------------------------------------------------------------

def test_progress_lines_every_n_steps_or_seconds(caplog):
    now = [0.0]
    progress = ProgressLog(total_steps=100, every=10, seconds=30, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="trainer.progress"):
        for step in range(1, 101):
            now[0] += 0.5 if step < 50 else 10.0  # slow down half way: time-based lines
            progress.step(step, {"cls": 1.0, "total": 2.0, "ramp": 0.1, "lr": 3e-6, "nnz": 7})
    steps = [int(r.getMessage().split()[1].split("/")[0]) for r in caplog.records]
    assert steps[:4] == [10, 20, 30, 40]
    assert steps[-1] == 100 and len(steps) > 10  # one every 3 steps once a step takes 10 s
    line = caplog.records[0].getMessage()
    assert line.startswith("step 10/100 (10.0%) cls 1 total 2 ramp 0.100 lr 3.00e-06 nnz 7 |")
    assert "steps/s, ETA" in line


def test_uda_train_logs_progress_when_stderr_is_not_a_terminal(tmp_path, world):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "trainer.cli", "--source", str(world["photo"]),
                          "--target", str(world["sketch"]), "--model", "uda-tiny-vit", "--pretrained",
                          "random", "--epochs", "1", "--iters-per-epoch", "4", "--batch-size", "4",
                          "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--log-every", "2",
                          "--workdir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    progress = [line for line in run.stderr.splitlines() if "steps/s, ETA" in line]
    assert [line.split("step ")[1].split("/")[0] for line in progress] == ["2", "4"]


# -- OpenAI's activation -------------------------------------------------------------------------

def test_quick_gelu_is_recorded_and_a_gelu_base_refuses_the_residual(train, tmp_path):
    from residual_store import BaseSpec, FlatParams, check_compatible, fingerprint, from_bytes
    from residual_store.errors import ResidualMismatch

    assert train(tmp_path / "run", "--quick-gelu") == 0
    residual = from_bytes((tmp_path / "run" / "residual.safetensors").read_bytes())
    assert residual.metadata["base_activation"] == "quick_gelu"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["quick_gelu"] == {"value": True, "from": "flag"}
    quick = BaseSpec("uda-tiny-vit", "random", quick_gelu=True).build().visual
    assert residual.metadata["base_fingerprint"] == fingerprint(quick)
    gelu = BaseSpec("uda-tiny-vit", "random").build().visual  # same weights, other activation
    with pytest.raises(ResidualMismatch, match="QuickGELU"):
        check_compatible(residual, FlatParams(gelu).layout, fingerprint(gelu), 64, activation="gelu")
