"""Pre-train the digits teacher: a tiny CLIP that has only ever seen typeset digits.

The model is bench/digits/digitclip.json (toyworld's tiny ModifiedResNet image tower at 32 px
and 2-layer text transformer; bench/toyworld/README.md says why not a ViT). It is trained from
scratch with open_clip's contrastive loss on captioned pictures of digits in the fonts of
this machine (bench/digits/fonts.py): no MNIST digit and no photograph is ever shown to it, so
its zero-shot accuracy on handwriting (source) and on MNIST-M (target) is that of a CLIP
meeting both for the first time. The checkpoint is a safetensors state dict, loaded the way
real weights are:

    uda-train --model bench/digits/digitclip.json --pretrained runs/digits/digitclip.safetensors ...

A sidecar CKPT.json records the settings (fonts included), the loss curve and the zero-shot
accuracy per domain; a later call with the same settings reuses the checkpoint.

    python -m bench.digits.teacher --data runs/digits/data    # train (or reuse) and report zero-shot
    python -m bench.digits.teacher --quick ...                # a few steps on a few pictures (tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import threads_set
from bench.digits import fonts
from bench.digits.data import CLASSES, DOMAINS
from bench.toyworld.teacher import _lr_at, _optimizer, load_sidecar, save_checkpoint, sidecar_path
from residual_store.base import BaseSpec, input_size
from residual_store.errors import BaseModelError
from residual_store.preprocess import CLIP_MEAN, CLIP_STD, eval_transform

logger = logging.getLogger(__name__)

MODEL_CONFIG = Path(__file__).with_name("digitclip.json")
ZERO_SHOT_PROMPT = 'a photo of the number: "{}"'  # METHOD.md's digits prompt
# Bump when the pool or the training changes, so an old checkpoint is retrained, not reused.
TEACHER_VERSION = 1


@dataclasses.dataclass
class TeacherConfig:
    """One pre-training run; every field but the last three goes into the sidecar, so a
    changed one retrains. The names lr, weight_decay, warmup and steps are toyworld's: its
    optimiser and schedule serve here too."""

    out: Path = Path("runs/digits/digitclip.safetensors")  # checkpoint (safetensors state dict)
    model: str = str(MODEL_CONFIG)  # open_clip model-config JSON
    per_class: int = 500  # pre-training pictures per digit
    captions_per_image: int = 4  # a random one of them is used each time the picture is drawn
    steps: int = 800  # optimiser steps
    batch_size: int = 128  # picture-caption pairs per step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.1  # AdamW, on matrices only
    warmup: int = 100  # linear warm-up steps before the cosine decay
    seed: int = 0  # pictures, initialisation and batch order
    workers: int = 2  # processes drawing the pool
    threads: int = 1  # torch CPU threads; one is faster than two on a busy 2-core machine

    def validate(self) -> None:
        problems = [f"{name} {getattr(self, name)} is out of range: expected >= 1"
                    for name in ("per_class", "captions_per_image", "steps", "batch_size", "workers", "threads")
                    if getattr(self, name) < 1]
        if not self.lr > 0:
            problems.append(f"lr {self.lr} is out of range: expected > 0")
        if self.warmup < 0:
            problems.append(f"warmup {self.warmup} is out of range: expected >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def identity(self, font_list: Sequence[fonts.Font]) -> dict:
        """The settings that decide the weights (the output path and the processes do not)."""
        d = dataclasses.asdict(self)
        for name in ("out", "workers", "threads"):
            d.pop(name)
        d["model_config"] = json.loads(Path(self.model).read_text())
        d["fonts"] = fonts.fonts_digest(font_list)
        d["version"] = TEACHER_VERSION
        return d


QUICK = dict(per_class=12, steps=20, batch_size=32, warmup=5)


# -- the captioned pool --------------------------------------------------------------------------

@dataclasses.dataclass
class Pool:
    images: torch.Tensor  # uint8 (N, 3, R, R), already resized for the train crop
    tokens: torch.Tensor  # int64 (N, K, context_length): K captions per picture


def _draw_pool_item(job: tuple) -> tuple[np.ndarray, list[str]]:
    digit, index, seed, resize, n_captions, font_list = job
    rng = fonts.picture_rng(seed, digit, index)
    picture = fonts.draw(digit, font_list[int(rng.integers(len(font_list)))], rng, resize)
    return np.asarray(picture.image, np.uint8), fonts.captions(picture, rng, n_captions)


def build_pool(cfg: TeacherConfig, font_list: Sequence[fonts.Font], model_size: int, tokenizer) -> Pool:
    # Drawn at the trainer's train resize (round(S*256/224)) and cropped to S when used.
    resize = round(model_size * 256 / 224)
    jobs = [(digit, i, cfg.seed, resize, cfg.captions_per_image, tuple(font_list))
            for digit in fonts.DIGITS for i in range(cfg.per_class)]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            items = list(pool.map(_draw_pool_item, jobs, chunksize=64))
    else:
        items = [_draw_pool_item(job) for job in jobs]
    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2).contiguous()
    tokens = tokenizer([c for _, caps in items for c in caps]).view(len(items), cfg.captions_per_image, -1)
    return Pool(images, tokens)


def random_crop(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A random size x size crop of each image, then CLIP normalisation. No flip: a mirrored
    digit is not that digit."""
    n, _, r, _ = images.shape
    offsets = torch.randint(0, r - size + 1, (n, 2), generator=g).tolist()
    x = torch.stack([im[:, oy:oy + size, ox:ox + size] for im, (oy, ox) in zip(images, offsets)]).float() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- training ------------------------------------------------------------------------------------

def pretrain(cfg: TeacherConfig, font_list: Sequence[fonts.Font],
             log_every: int = 100) -> tuple[torch.nn.Module, list[dict]]:
    """Build the model from its config with seeded random weights and train it contrastively."""
    from open_clip import ClipLoss

    spec = BaseSpec(cfg.model, None)
    torch.manual_seed(cfg.seed)
    model = spec.build("cpu")
    size = input_size(model)
    started = time.perf_counter()
    pool = build_pool(cfg, font_list, size, spec.tokenizer())
    logger.info("pool: %d pictures in %d fonts in %.1fs", len(pool.images), len(font_list),
                time.perf_counter() - started)
    loss_fn = ClipLoss()
    opt = _optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    history = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, len(pool.images), (cfg.batch_size,), generator=g)
        pick = torch.randint(0, cfg.captions_per_image, (cfg.batch_size,), generator=g)
        image_f = F.normalize(model.encode_image(random_crop(pool.images[idx], size, g)), dim=-1)
        text_f = F.normalize(model.encode_text(pool.tokens[idx, pick]), dim=-1)
        loss = loss_fn(image_f, text_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: the temperature never exceeds 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "lr": _lr_at(step, cfg),
                            "seconds": round(time.perf_counter() - started, 1)})
            logger.info("teacher step %d/%d loss %.4f", step, cfg.steps, float(loss.detach()))
    return model.eval(), history


# -- zero-shot evaluation ------------------------------------------------------------------------

@torch.no_grad()
def zero_shot(model: torch.nn.Module, tokenizer, root: Path, domains: Sequence[str],
              classes: Sequence[str] = CLASSES, prompt: str = ZERO_SHOT_PROMPT) -> dict[str, dict]:
    """Zero-shot accuracy and mean per-class accuracy on each domain folder
    ROOT/<domain>/<class>/*.png, with the evaluation transform uda-train and uda-serve use."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([prompt.format(c) for c in classes])), dim=-1)
    transform = eval_transform(input_size(model))
    out = {}
    for domain in domains:
        files = [(f, label) for label, cls in enumerate(classes)
                 for f in sorted((Path(root) / domain / cls).glob("*.png"))]
        preds = []
        for i in range(0, len(files), 256):
            x = torch.stack([transform(Image.open(f)) for f, _ in files[i:i + 256]])
            preds.append((F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(dim=1))
        labels = torch.tensor([label for _, label in files], dtype=torch.long)
        right = torch.cat(preds) == labels if files else torch.zeros(0, dtype=torch.bool)
        per_class = [float(right[labels == c].float().mean()) for c in range(len(classes)) if (labels == c).any()]
        out[domain] = {"accuracy": float(right.float().mean()) if files else math.nan,
                       "mean_class_accuracy": float(np.mean(per_class)) if per_class else math.nan}
    return out


def ensure_teacher(cfg: TeacherConfig, data_root: Path | None = None,
                   domains: Sequence[str] = DOMAINS, force: bool = False) -> dict:
    """Train (or reuse an identical) teacher; returns the sidecar: settings, losses, zero-shot."""
    cfg.validate()
    font_list = fonts.find_fonts()
    if not font_list:
        raise RuntimeError("no usable font found (fc-list, /usr/share/fonts, matplotlib's fonts): "
                           "install one, e.g. apt-get install fonts-dejavu-core")
    out = Path(cfg.out)
    identity = cfg.identity(font_list)
    sidecar = load_sidecar(out)
    if not force and sidecar and sidecar.get("settings") == identity:
        if data_root is None or set(domains) <= set(sidecar.get("zero_shot", {})):
            logger.info("reusing teacher %s", out)
            return sidecar
    # the zero-shot pass too: extra threads only wait on a busy CPU
    with threads_set(cfg.threads):
        sidecar = _train_and_measure(cfg, font_list, identity, data_root, domains)
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _train_and_measure(cfg: TeacherConfig, font_list: Sequence[fonts.Font], identity: dict,
                       data_root: Path | None, domains: Sequence[str]) -> dict:
    started = time.perf_counter()
    model, history = pretrain(cfg, font_list)
    seconds = time.perf_counter() - started
    save_checkpoint(model, Path(cfg.out))
    # Zero-shot is measured on the checkpoint as loaded, exactly what uda-train will get.
    spec = BaseSpec(cfg.model, str(cfg.out))
    try:
        loaded = spec.build("cpu")
    except BaseModelError as e:
        raise RuntimeError(f"the saved teacher does not load back: {e}") from e
    accuracy = zero_shot(loaded, spec.tokenizer(), data_root, domains) if data_root else {}
    return {"settings": identity, "checkpoint": str(cfg.out), "pretrain_seconds": round(seconds, 1),
            "history": history, "zero_shot": accuracy, "prompt": ZERO_SHOT_PROMPT,
            "logit_scale": float(loaded.logit_scale.detach().exp())}


def config_from(args: argparse.Namespace) -> TeacherConfig:
    values = dict(QUICK) if args.quick else {}
    for name in ("steps", "per_class", "batch_size", "lr"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return TeacherConfig(out=args.out, seed=args.seed, workers=args.workers, threads=args.threads, **values)


def main(argv: Sequence[str] | None = None) -> int:
    d = TeacherConfig()
    p = argparse.ArgumentParser(prog="python -m bench.digits.teacher",
                                description="Pre-train the digits teacher on typeset digits and "
                                            "report its zero-shot accuracy on MNIST and MNIST-M.")
    p.add_argument("--out", type=Path, default=d.out, help="checkpoint path (default: %(default)s)")
    p.add_argument("--data", type=Path, help="digits root to report zero-shot accuracy on "
                   "(written by bench.digits.data)")
    p.add_argument("--quick", action="store_true", help=f"a tiny run for tests: {QUICK}")
    p.add_argument("--steps", type=int)
    p.add_argument("--per-class", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="processes drawing the pool")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain even when an identical checkpoint exists")
    p.add_argument("--fonts", action="store_true", help="list the fonts used and exit")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="teacher: %(levelname)s: %(message)s")
    if args.fonts:
        for f in fonts.find_fonts():
            print(f"{f.name}  ({f.path})")
        return 0
    cfg = config_from(args)
    try:
        sidecar = ensure_teacher(cfg, args.data, force=args.force)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"teacher: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"teacher: {cfg.out} (pre-trained in {sidecar['pretrain_seconds']}s, final loss "
          f"{sidecar['history'][-1]['loss']})")
    for domain, acc in sidecar["zero_shot"].items():
        print(f"  zero-shot {domain:<7} {100 * acc['accuracy']:5.1f}%  (mean per class "
              f"{100 * acc['mean_class_accuracy']:.1f}%, chance {100 / len(CLASSES):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
