"""Pre-train a tiny CLIP in the toy world: the stand-in for web-scale CLIP weights.

The model is bench/toyworld/toyclip.json (a small ModifiedResNet image tower on 32 px images,
see README.md for why not a ViT). It is trained with
open_clip's contrastive loss on captioned images of the seven pre-training styles only
(world.PRETRAIN_STYLES): the adaptation domains photo, sketch and clipart are never seen, so
its zero-shot accuracy on them is that of a CLIP meeting a new domain. The checkpoint is a
safetensors state dict, loadable the way real weights are:

    uda-train --model bench/toyworld/toyclip.json --pretrained runs/toyworld/toyclip.safetensors ...

A sidecar CKPT.json records the settings and the zero-shot accuracy per domain; a later call
with the same settings reuses the checkpoint instead of training again.

    python -m bench.toyworld.teacher --world runs/toyworld/world --out runs/toyworld/toyclip.safetensors
    python -m bench.toyworld.teacher --quick ...   # a few hundred images, well under a minute
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
from safetensors.torch import save_file

from bench.common import threads_set
from bench.toyworld import world
from residual_store.base import BaseSpec, input_size
from residual_store.errors import BaseModelError
from residual_store.preprocess import CLIP_MEAN, CLIP_STD, eval_transform

logger = logging.getLogger(__name__)

MODEL_CONFIG = Path(__file__).with_name("toyclip.json")
ZERO_SHOT_PROMPT = "a photo of a {}."
POOL_SEED_OFFSET = 1000  # pre-training images never share a random stream with the domains


@dataclasses.dataclass
class TeacherConfig:
    """One pre-training run; every field goes into the sidecar so a changed one retrains."""

    out: Path = Path("runs/toyworld/toyclip.safetensors")  # checkpoint (safetensors state dict)
    model: str = str(MODEL_CONFIG)  # open_clip model-config JSON
    styles: tuple[str, ...] = world.PRETRAIN_STYLES  # styles of the captioned pre-training images
    per_class: int = 100  # pre-training images per class per style
    captions_per_image: int = 4  # a random one of them is used each time the image is drawn
    steps: int = 1000  # optimiser steps
    batch_size: int = 128  # image-caption pairs per step
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.1  # AdamW, on matrices only
    warmup: int = 200  # linear warm-up steps before the cosine decay
    seed: int = 0  # pool rendering, initialisation and batch order
    image_size: int = world.DEFAULT_SIZE  # side of the rendered images before resizing to the model
    workers: int = 2  # processes rendering the pool
    threads: int = 1  # torch CPU threads; one is faster than two on a busy 2-core machine

    def validate(self) -> None:
        problems = []
        for name in ("per_class", "captions_per_image", "steps", "batch_size", "workers", "threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)} is out of range: expected >= 1")
        if not self.lr > 0:
            problems.append(f"lr {self.lr} is out of range: expected > 0")
        if self.warmup < 0:
            problems.append(f"warmup {self.warmup} is out of range: expected >= 0")
        bad = [s for s in self.styles if s not in world.STYLES]
        if bad:
            problems.append(f"unknown styles {bad}: expected some of {', '.join(world.STYLES)}")
        if problems:
            raise ValueError("; ".join(problems))

    def identity(self) -> dict:
        """The settings that decide the weights (the output path does not)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        d.pop("workers")
        d.pop("threads")
        d["styles"] = list(self.styles)
        d["model_config"] = json.loads(Path(self.model).read_text())
        d["world_version"] = world.WORLD_VERSION
        return d


QUICK = dict(per_class=40, steps=300, batch_size=128, warmup=50)


# -- the captioned pool --------------------------------------------------------------------------

@dataclasses.dataclass
class Pool:
    images: torch.Tensor  # uint8 (N, 3, R, R), already resized for the train crop
    tokens: torch.Tensor  # int64 (N, K, context_length): K captions per image
    shapes: list[str]
    styles: list[str]


def _render_pool_item(job: tuple[str, str, int, int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    style, shape, index, seed, size, resize, n_captions = job
    drawn = world.render(style, shape, index, seed, size)
    image = drawn.image.resize((resize, resize), Image.BILINEAR)
    rng = world.image_rng(seed, "captions", f"{style}/{shape}", index)
    return np.asarray(image, np.uint8), world.captions(drawn, rng, n_captions)


def build_pool(cfg: TeacherConfig, model_size: int, tokenizer) -> Pool:
    # Resize as the trainer's train transform does (round(S*256/224)) and crop S later.
    resize = round(model_size * 256 / 224)
    jobs = [(style, shape, i, cfg.seed + POOL_SEED_OFFSET, cfg.image_size, resize, cfg.captions_per_image)
            for style in cfg.styles for shape in world.CLASSES for i in range(cfg.per_class)]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            items = list(pool.map(_render_pool_item, jobs, chunksize=64))
    else:
        items = [_render_pool_item(job) for job in jobs]
    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2).contiguous()
    texts = [c for _, caps in items for c in caps]
    tokens = tokenizer(texts).view(len(items), cfg.captions_per_image, -1)
    return Pool(images, tokens, [j[1] for j in jobs], [j[0] for j in jobs])


def _augment(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Random crop S and horizontal flip, then CLIP normalisation (the trainer's recipe)."""
    n, _, r, _ = images.shape
    ox = torch.randint(0, r - size + 1, (n,), generator=g)
    oy = torch.randint(0, r - size + 1, (n,), generator=g)
    idx = torch.arange(size)
    rows = (oy[:, None] + idx[None, :])[:, None, :, None].expand(n, 3, size, r)
    cropped = images.gather(2, rows)
    cols = (ox[:, None] + idx[None, :])[:, None, None, :].expand(n, 3, size, size)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    x = cropped.float() / 255
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- training ------------------------------------------------------------------------------------

def _optimizer(model: torch.nn.Module, cfg: TeacherConfig) -> torch.optim.Optimizer:
    # The token embedding (49408 x width) stays at its random init: the world uses about 60
    # of its words, and updating the whole table would cost most of every step. Random
    # vectors are distinct enough for the text transformer on top to learn from.
    model.token_embedding.weight.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Decay only matrices: biases, norms, positional embeddings and the temperature stay free.
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def _lr_at(step: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def pretrain(cfg: TeacherConfig, log_every: int = 100) -> tuple[torch.nn.Module, list[dict]]:
    """Build the model from its config with seeded random weights and train it contrastively."""
    from open_clip import ClipLoss

    spec = BaseSpec(cfg.model, None)
    torch.manual_seed(cfg.seed)
    model = spec.build("cpu")
    size = input_size(model)
    started = time.perf_counter()
    pool = build_pool(cfg, size, spec.tokenizer())
    logger.info("pool: %d images (%d styles) in %.1fs", len(pool.images), len(cfg.styles),
                time.perf_counter() - started)
    loss_fn = ClipLoss()
    opt = _optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    history = []
    n = len(pool.images)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        pick = torch.randint(0, cfg.captions_per_image, (cfg.batch_size,), generator=g)
        x = _augment(pool.images[idx], size, g)
        text = pool.tokens[idx, pick]
        image_f = F.normalize(model.encode_image(x), dim=-1)
        text_f = F.normalize(model.encode_text(text), dim=-1)
        loss = loss_fn(image_f, text_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: the temperature never exceeds 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "lr": _lr_at(step, cfg),
                            "seconds": round(time.perf_counter() - started, 1)})
            logger.info("step %d loss %.4f", step, float(loss.detach()))
    return model.eval(), history


# -- zero-shot evaluation ------------------------------------------------------------------------

@torch.no_grad()
def zero_shot(model: torch.nn.Module, tokenizer, root: Path, domains: Sequence[str],
              prompt: str = ZERO_SHOT_PROMPT) -> dict[str, float]:
    """Zero-shot accuracy on each domain folder ROOT/<domain>/<class>/*.png, with the
    evaluation transform the trainer and server use."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([prompt.format(c) for c in world.CLASSES])), dim=-1)
    transform = eval_transform(input_size(model))
    out = {}
    for domain in domains:
        correct = total = 0
        for label, cls in enumerate(world.CLASSES):
            files = sorted((Path(root) / domain / cls).glob("*.png"))
            if not files:
                continue
            x = torch.stack([transform(Image.open(f)) for f in files])
            pred = (F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(dim=1)
            correct += int((pred == label).sum())
            total += len(files)
        out[domain] = correct / total if total else float("nan")
    return out


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def sidecar_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".json")


def load_sidecar(ckpt: Path) -> dict | None:
    path = sidecar_path(ckpt)
    if not (ckpt.is_file() and path.is_file()):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_teacher(cfg: TeacherConfig, world_root: Path | None = None,
                   domains: Sequence[str] = world.DOMAINS, force: bool = False) -> dict:
    """Train (or reuse an identical) teacher; returns the sidecar: settings, losses, zero-shot."""
    cfg.validate()
    out = Path(cfg.out)
    sidecar = load_sidecar(out)
    if not force and sidecar and sidecar.get("settings") == cfg.identity():
        if world_root is None or set(domains) <= set(sidecar.get("zero_shot", {})):
            logger.info("reusing teacher %s", out)
            return sidecar
    started = time.perf_counter()
    with threads_set(cfg.threads):
        model, history = pretrain(cfg)
    seconds = time.perf_counter() - started
    save_checkpoint(model, out)
    # Zero-shot is measured on the checkpoint as loaded, exactly what uda-train will get.
    spec = BaseSpec(cfg.model, str(out))
    try:
        loaded = spec.build("cpu")
    except BaseModelError as e:
        raise RuntimeError(f"the saved teacher does not load back: {e}") from e
    accuracy = zero_shot(loaded, spec.tokenizer(), world_root, domains) if world_root else {}
    sidecar = {"settings": cfg.identity(), "checkpoint": str(out), "pretrain_seconds": round(seconds, 1),
               "history": history, "zero_shot": accuracy, "prompt": ZERO_SHOT_PROMPT,
               "logit_scale": float(loaded.logit_scale.detach().exp())}
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def main(argv: Sequence[str] | None = None) -> int:
    d = TeacherConfig()
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.teacher",
                                description="Pre-train the toy world's tiny CLIP and report its "
                                            "zero-shot accuracy per domain.")
    p.add_argument("--out", type=Path, default=d.out, help="checkpoint path (default: %(default)s)")
    p.add_argument("--world", type=Path, help="world root to report zero-shot accuracy on "
                   "(written by bench.toyworld.world)")
    p.add_argument("--quick", action="store_true", help=f"a tiny run for tests: {QUICK}")
    p.add_argument("--steps", type=int)
    p.add_argument("--per-class", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="processes rendering the pool")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain even when an identical checkpoint exists")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="teacher: %(levelname)s: %(message)s")
    cfg = config_from(args)
    try:
        sidecar = ensure_teacher(cfg, args.world, force=args.force)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"teacher: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"teacher: {cfg.out} (pre-trained in {sidecar['pretrain_seconds']}s, final loss "
          f"{sidecar['history'][-1]['loss']})")
    for domain, acc in sidecar["zero_shot"].items():
        print(f"  zero-shot {domain:<8} {100 * acc:5.1f}%  (chance {100 / len(world.CLASSES):.0f}%)")
    return 0


def config_from(args: argparse.Namespace) -> TeacherConfig:
    values = dict(QUICK) if args.quick else {}
    for name in ("steps", "per_class", "batch_size", "lr"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return TeacherConfig(out=args.out, seed=args.seed, workers=args.workers, threads=args.threads, **values)


if __name__ == "__main__":
    sys.exit(main())
