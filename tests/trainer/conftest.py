"""Fixtures for the trainer tests: a tiny generated image world and a `train` helper that runs
`uda-train` main() with fast settings (tiny models, a few steps, no worker processes)."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from trainer import cli
from trainer.config import TrainConfig
from trainer.demo import make_shapes_world
from trainer.loop import Trainer

CLASSES = ("circle", "square", "triangle")
FAST = ("--pretrained", "random", "--epochs", "1", "--iters-per-epoch", "3", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--head-lr-mult", "10",
        "--eval-batch-size", "16")


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """Read-only: photo/sketch domains, 3 classes x 5 images of 40 px. Copy before changing."""
    return make_shapes_world(tmp_path_factory.mktemp("world"), classes=CLASSES, per_class=5, size=40)


@pytest.fixture
def world_copy(world, tmp_path) -> dict[str, Path]:
    """A private, modifiable copy of the world."""
    out = {}
    for name, path in world.items():
        out[name] = tmp_path / "data" / name
        shutil.copytree(path, out[name])
    return out


@pytest.fixture
def train(world):
    """train(workdir, *extra, model=..., source=..., target=...) -> main()'s exit code.
    `data=[...]` replaces the --source/--target flags (e.g. with --data-root ...)."""

    def run(workdir: Path, *extra: str, model: str = "uda-tiny-vit", source: Path | None = None,
            target: Path | None = None, data: list[str] | None = None) -> int:
        if data is None:
            data = ["--source", str(source or world["photo"]), "--target", str(target or world["sketch"])]
        return cli.main([*data, "--model", model, *FAST, "--workdir", str(workdir), *extra])

    return run


@pytest.fixture
def make_trainer(world):
    """make_trainer(workdir, **TrainConfig fields) -> a set-up Trainer with the FAST settings."""

    def make(workdir: Path, **fields) -> Trainer:
        values = dict(source=world["photo"], target=world["sketch"], model="uda-tiny-vit",
                      pretrained=None, epochs=1, iters_per_epoch=3, batch_size=4, lr=1e-3,
                      head_lr_mult=10, workers=0, device="cpu", eval_batch_size=16, workdir=workdir)
        cfg = TrainConfig(**{**values, **fields})
        cfg.validate()
        trainer = Trainer(cfg)
        trainer.setup()
        return trainer

    return make


@pytest.fixture
def truncated_jpeg():
    """write(path, like=png): the first 60% of a JPEG of `like`. Pillow's verify() accepts it;
    only decoding finds the missing data."""

    def write(path: Path, like: Path) -> Path:
        buf = io.BytesIO()
        Image.open(like).convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=95)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
        with Image.open(path) as im:
            im.verify()  # so a scan that only verifies would keep it
        return path

    return write
