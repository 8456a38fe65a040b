"""A procedural vision-language world: ten shapes drawn by Pillow in ten styles, with captions.

Three styles are the *domains* the adaptation runs between (written to disk as ImageFolder
trees, `DIR/<domain>/<class>/<index>.png`):

- photo:   a shaded, colourful shape with a drop shadow on a textured background (stripes,
           checks, blotches or a gradient), blurred a little and noisy;
- sketch:  a thin, wobbly dark outline on off-white paper, sometimes hatched inside;
- clipart: a flat saturated fill with a thick dark border on a plain light background.

Seven more styles exist only to pre-train the teacher (bench/toyworld/teacher.py), standing in
for the web: each is a relative of the domains but none is one of them exactly (silhouette,
neon, pixel, dotted, painting, doodle, sticker). Every image of a pre-training style comes
with captions ("a red star sticker on a striped background.", "a photo of a star.").

Every image is a pure function of (seed, style, class, index), so the world is the same
whichever order or process renders it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

CLASSES = ("arrow", "circle", "crescent", "cross", "diamond",
           "hexagon", "ring", "square", "star", "triangle")
DOMAINS = ("photo", "sketch", "clipart")
PRETRAIN_STYLES = ("silhouette", "neon", "pixel", "dotted", "painting", "doodle", "sticker")
STYLES = DOMAINS + PRETRAIN_STYLES

# Named colours: captions say the name, images use the base value with a little jitter.
COLOURS = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210),
    "yellow": (235, 210, 40), "orange": (240, 140, 30), "purple": (140, 60, 180),
    "pink": (240, 120, 180), "brown": (130, 80, 40), "cyan": (40, 200, 210),
    "grey": (128, 128, 128), "black": (20, 20, 20), "white": (245, 245, 245),
}
BRIGHT = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
LIGHT_BG = {"white": (245, 245, 245), "light blue": (200, 220, 245), "light yellow": (250, 240, 190),
            "light pink": (250, 215, 225), "light green": (210, 240, 205), "light grey": (215, 215, 215)}

SUPERSAMPLE = 2  # shapes are drawn at 2x and downscaled, for smooth (anti-aliased) edges
DEFAULT_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Drawn:
    """One rendered image and what a caption may say about it."""

    image: Image.Image
    shape: str
    style: str
    colour: str  # name of the shape's main colour (fill or stroke)
    background: str  # a phrase: "striped", "dark", "light blue", ...


# -- geometry ------------------------------------------------------------------------------------

def _ring(n: int, radius: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([dx + radius * np.cos(t), dy + radius * np.sin(t)], axis=1)


def _poly(points: Sequence[tuple[float, float]], per_edge: int = 8) -> np.ndarray:
    """Polygon corners with extra points along each edge, so wobble bends the edges too."""
    pts = np.asarray(points, dtype=np.float64)
    out = []
    for a, b in zip(pts, np.roll(pts, -1, axis=0)):
        for k in range(per_edge):
            out.append(a + (b - a) * k / per_edge)
    return np.asarray(out)


def _regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def shape_layers(shape: str) -> list[tuple[np.ndarray, int]]:
    """The shape in unit coordinates (centre 0, radius about 1, y down) as mask layers:
    polygons drawn in order with value 255 (ink) or 0 (a hole)."""
    if shape == "circle":
        return [(_ring(64, 0.95), 255)]
    if shape == "ring":
        return [(_ring(64, 1.0), 255), (_ring(64, 0.58), 0)]
    if shape == "crescent":
        return [(_ring(64, 1.0), 255), (_ring(64, 0.85, dx=0.48, dy=-0.12), 0)]
    if shape == "square":
        return [(_poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), 255)]
    if shape == "diamond":
        return [(_poly([(0, -1.0), (0.62, 0), (0, 1.0), (-0.62, 0)]), 255)]
    if shape == "triangle":
        return [(_poly([(x, y + 0.15) for x, y in _regular(3, 1.05, -math.pi / 2)]), 255)]
    if shape == "hexagon":
        return [(_poly(_regular(6, 0.95, 0.0), per_edge=6), 255)]
    if shape == "star":
        pts = [(r * math.cos(-math.pi / 2 + math.pi * k / 5), r * math.sin(-math.pi / 2 + math.pi * k / 5))
               for k, r in zip(range(10), [1.0, 0.42] * 5)]
        return [(_poly([(x, y + 0.06) for x, y in pts], per_edge=4), 255)]
    if shape == "cross":
        a, w = 0.95, 0.3
        return [(_poly([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                        (-w, w), (-a, w), (-a, -w), (-w, -w)], per_edge=4), 255)]
    if shape == "arrow":
        return [(_poly([(-0.95, -0.22), (0.15, -0.22), (0.15, -0.62), (0.95, 0), (0.15, 0.62),
                        (0.15, 0.22), (-0.95, 0.22)], per_edge=4), 255)]
    raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(CLASSES)}")


def shape_mask(shape: str, rng: np.random.Generator, px: int, wobble: float = 0.0,
               radius: tuple[float, float] = (0.30, 0.42), grid: int | None = None) -> Image.Image:
    """An 'L' mask of the shape placed at a random position, size and small rotation.

    wobble: amplitude of hand-drawn distortion (0 for ruler-straight edges);
    grid: draw at grid x grid pixels and scale up without smoothing (pixel art).
    """
    canvas = grid or px
    r = rng.uniform(*radius) * canvas
    room = canvas / 2 - r * 1.02
    cx, cy = canvas / 2 + rng.uniform(-1, 1, size=2) * max(room, 0.0)
    # Rotation stays small: a square turned 45 degrees would be a diamond.
    angle = math.radians(rng.uniform(-15, 15))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    freq, phase = rng.integers(2, 5), rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for points, value in shape_layers(shape):
        pts = points
        if wobble:
            theta = np.arctan2(pts[:, 1], pts[:, 0])
            scale = 1 + wobble * np.sin(freq * theta + phase)
            pts = pts * scale[:, None] + rng.normal(0, wobble * 0.4, size=pts.shape)
        xy = pts @ rot.T * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in xy], fill=value)
    if grid:
        mask = mask.resize((px, px), Image.NEAREST)
    return mask


def outline(mask: Image.Image, width: int) -> Image.Image:
    """The band of `width` pixels along every edge of the mask (outer and inner)."""
    return ImageChops.subtract(_grow(mask, width // 2), ImageChops.invert(_grow(ImageChops.invert(mask), width // 2)))


def _grow(mask: Image.Image, k: int) -> Image.Image:
    """Binary dilation by a (2k+1) square: a box blur is non-zero exactly where MaxFilter would
    be, and costs the same for any k (MaxFilter grows with k squared)."""
    return mask.filter(ImageFilter.BoxBlur(k)).point(lambda v: 255 if v > 0 else 0)


# -- textures ------------------------------------------------------------------------------------

def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: float = 18) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float64) + rng.normal(0, amount, 3), 0, 255)


def _coords(px: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:px, 0:px].astype(np.float64)
    return x, y


def plain(px: int, rgb: Sequence[float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float64), (px, px, 3)).copy()


def gradient(px: int, a: Sequence[float], b: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    x, y = _coords(px)
    t = rng.uniform(0, 2 * math.pi)
    s = (x * math.cos(t) + y * math.sin(t)) / px
    s = (s - s.min()) / max(s.max() - s.min(), 1e-9)
    return np.asarray(a)[None, None] * (1 - s[..., None]) + np.asarray(b)[None, None] * s[..., None]


def pattern(kind: str, px: int, a: Sequence[float], b: Sequence[float],
            rng: np.random.Generator) -> np.ndarray:
    """Two-colour background patterns: 'striped', 'checkered', 'dotted', 'blotchy'."""
    x, y = _coords(px)
    period = rng.uniform(0.1, 0.2) * px
    if kind == "striped":
        t = rng.uniform(0, math.pi)
        on = ((x * math.cos(t) + y * math.sin(t)) // (period / 2)) % 2 == 0
    elif kind == "checkered":
        on = ((x // (period / 2)) + (y // (period / 2))) % 2 == 0
    elif kind == "dotted":
        fx, fy = (x % period) - period / 2, (y % period) - period / 2
        on = fx ** 2 + fy ** 2 < (period * 0.28) ** 2
    elif kind == "blotchy":
        low = rng.uniform(0, 1, size=(6, 6))
        smooth = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((px, px), Image.BICUBIC),
                            np.float64) / 255
        return np.asarray(a)[None, None] * (1 - smooth[..., None]) + np.asarray(b)[None, None] * smooth[..., None]
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return np.where(on[..., None], np.asarray(a)[None, None], np.asarray(b)[None, None])


def compose(bg: np.ndarray, fg: np.ndarray | Sequence[float], mask: Image.Image) -> np.ndarray:
    m = (np.asarray(mask, np.float64) / 255)[..., None]
    return bg * (1 - m) + np.asarray(fg, np.float64) * m


def _finish(arr: np.ndarray, size: int, rng: np.random.Generator, noise: float = 0.0,
            blur: float = 0.0) -> Image.Image:
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    im = im.resize((size, size), Image.LANCZOS)
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        a = np.asarray(im, np.float64) + rng.normal(0, noise, (size, size, 3))
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return im


def _colour(rng: np.random.Generator, names: Sequence[str] = BRIGHT) -> tuple[str, np.ndarray]:
    name = str(rng.choice(list(names)))
    return name, _jitter(COLOURS[name], rng)


def _far_colour(rng: np.random.Generator, avoid: Sequence[np.ndarray]) -> tuple[str, np.ndarray]:
    """A bright named colour that stands out from the given background colours."""
    best = None
    for _ in range(12):
        name, rgb = _colour(rng)
        d = min(float(np.linalg.norm(rgb - a)) for a in avoid)
        if best is None or d > best[0]:
            best = (d, name, rgb)
        if d > 110:
            break
    return best[1], best[2]


# -- styles --------------------------------------------------------------------------------------

def _photo(shape, rng, px, size):
    kind = str(rng.choice(["striped", "checkered", "blotchy", "gradient"]))
    a, b = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    bg = gradient(px, a, b, rng) if kind == "gradient" else pattern(kind, px, a, b, rng)
    name, rgb = _far_colour(rng, [a, b])
    mask = shape_mask(shape, rng, px)
    shadow = Image.fromarray(np.roll(np.asarray(mask), (3 * SUPERSAMPLE,) * 2, axis=(0, 1)))
    shadow = shadow.filter(ImageFilter.GaussianBlur(2 * SUPERSAMPLE))
    bg = bg * (1 - 0.5 * (np.asarray(shadow, np.float64) / 255)[..., None])
    shade = gradient(px, np.clip(rgb * 1.3 + 20, 0, 255), rgb * 0.65, rng)
    return _finish(compose(bg, shade, mask), size, rng, noise=6, blur=0.4), name, kind


def _sketch(shape, rng, px, size):
    paper = _jitter((244, 241, 234), rng, 5)
    mask = shape_mask(shape, rng, px, wobble=0.05)
    ink = _jitter((40, 40, 45), rng, 10)
    arr = plain(px, paper)
    if rng.uniform() < 0.3:  # light hatching inside, as sketches often have
        hatch = pattern("striped", px, (1, 1, 1), (0, 0, 0), rng)[..., 0]
        inside = Image.fromarray((np.asarray(mask, np.float64) * hatch * 0.35).astype(np.uint8))
        arr = compose(arr, ink, inside)
    width = int(rng.integers(2, 6))
    return _finish(compose(arr, ink, outline(mask, width)), size, rng, noise=2), "black", "white"


def _clipart(shape, rng, px, size):
    bg_name = str(rng.choice(list(LIGHT_BG)))
    name, rgb = _colour(rng)
    border = _jitter((25, 25, 30), rng, 8) if rng.uniform() < 0.6 else rgb * 0.4
    mask = shape_mask(shape, rng, px)
    arr = compose(plain(px, LIGHT_BG[bg_name]), rgb, mask)
    arr = compose(arr, border, outline(mask, int(rng.integers(6, 11))))
    return _finish(arr, size, rng), name, bg_name


def _silhouette(shape, rng, px, size):
    bg_name = str(rng.choice(list(LIGHT_BG) + list(BRIGHT)))
    bg = LIGHT_BG.get(bg_name) or COLOURS[bg_name]
    return _finish(compose(plain(px, _jitter(bg, rng)), _jitter(COLOURS["black"], rng, 8),
                           shape_mask(shape, rng, px)), size, rng), "black", bg_name


def _neon(shape, rng, px, size):
    name, rgb = _colour(rng)
    line = outline(shape_mask(shape, rng, px), int(rng.integers(4, 8)))
    glow = line.filter(ImageFilter.GaussianBlur(4 * SUPERSAMPLE))
    glow = Image.fromarray(np.clip(np.asarray(glow, np.float64) * 1.6, 0, 255).astype(np.uint8))
    arr = compose(plain(px, _jitter((15, 15, 25), rng, 6)), rgb * 0.6, glow)
    arr = compose(arr, np.clip(rgb * 0.5 + 128, 0, 255), line)
    return _finish(arr, size, rng), name, str(rng.choice(["dark", "black"]))


def _pixel(shape, rng, px, size):
    bg_name = str(rng.choice(list(LIGHT_BG)))
    name, rgb = _colour(rng)
    mask = shape_mask(shape, rng, px, grid=int(rng.integers(10, 16)))
    arr = compose(plain(px, LIGHT_BG[bg_name]), rgb, mask)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return im, name, bg_name


def _dotted(shape, rng, px, size):
    name, rgb = _colour(rng)
    mask = shape_mask(shape, rng, px)
    dots = pattern("dotted", px, (1, 1, 1), (0, 0, 0), rng)[..., 0]
    inside = Image.fromarray((np.asarray(mask, np.float64) * dots).astype(np.uint8))
    return _finish(compose(plain(px, _jitter((245, 245, 245), rng, 5)), rgb, inside), size, rng), name, "white"


def _painting(shape, rng, px, size):
    a_name, a = _colour(rng)
    b = rng.uniform(60, 230, 3)
    name, rgb = _far_colour(rng, [a, b])
    strokes = pattern("blotchy", px, rgb * 0.7, np.clip(rgb * 1.3, 0, 255), rng)
    mask = shape_mask(shape, rng, px, wobble=0.03).filter(ImageFilter.GaussianBlur(1.5 * SUPERSAMPLE))
    return _finish(compose(gradient(px, a, b, rng), strokes, mask), size, rng, noise=4), name, a_name


def _doodle(shape, rng, px, size):
    bg_name = str(rng.choice(["light blue", "light yellow", "light pink", "light green"]))
    name, rgb = _colour(rng)
    line = outline(shape_mask(shape, rng, px, wobble=0.09), int(rng.integers(3, 7)))
    return _finish(compose(plain(px, LIGHT_BG[bg_name]), rgb * 0.8, line), size, rng), name, bg_name


def _sticker(shape, rng, px, size):
    kind = str(rng.choice(["striped", "checkered", "dotted"]))
    a, b = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    name, rgb = _far_colour(rng, [a, b])
    mask = shape_mask(shape, rng, px, radius=(0.26, 0.36))
    border = _grow(mask, int(rng.integers(3, 6)) * SUPERSAMPLE)
    arr = compose(pattern(kind, px, a, b, rng), (250, 250, 250), border)
    return _finish(compose(arr, rgb, mask), size, rng), name, kind


_RENDERERS = {
    "photo": _photo, "sketch": _sketch, "clipart": _clipart, "silhouette": _silhouette,
    "neon": _neon, "pixel": _pixel, "dotted": _dotted, "painting": _painting,
    "doodle": _doodle, "sticker": _sticker,
}


def image_rng(seed: int, style: str, shape: str, index: int) -> np.random.Generator:
    """The random stream of one image: independent of rendering order and process."""
    digest = hashlib.sha256(f"{seed}|{style}|{shape}|{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render(style: str, shape: str, index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> Drawn:
    """Image `index` of `shape` in `style` (size x size RGB)."""
    if style not in _RENDERERS:
        raise ValueError(f"unknown style {style!r}: expected one of {', '.join(STYLES)}")
    rng = image_rng(seed, style, shape, index)
    image, colour, background = _RENDERERS[style](shape, rng, size * SUPERSAMPLE, size)
    return Drawn(image, shape, style, colour, background)


# -- captions ------------------------------------------------------------------------------------

_STYLE_PHRASES = {
    "silhouette": ["a black silhouette of a {shape}.", "a silhouette of a {shape} on a {bg} background."],
    "neon": ["a glowing {colour} neon {shape}.", "a neon sign of a {shape} on a {bg} background."],
    "pixel": ["a pixel art {shape}.", "a {colour} pixel art {shape} on a {bg} background."],
    "dotted": ["a dotted {colour} {shape}.", "a {shape} made of {colour} dots."],
    "painting": ["a painting of a {colour} {shape}.", "a painted {shape} on a {bg} background."],
    "doodle": ["a {colour} doodle of a {shape}.", "a hand drawn {shape} on {bg} paper."],
    "sticker": ["a {colour} {shape} sticker on a {bg} background.", "a sticker of a {shape}."],
}
_GENERIC = ["a photo of a {shape}.", "a {shape}.", "a picture of a {colour} {shape}.",
            "a {colour} {shape} on a {bg} background.", "an image of a {shape}."]


def captions(drawn: Drawn, rng: np.random.Generator, n: int = 4) -> list[str]:
    """n captions of a pre-training image, mixing generic and style-specific phrasings."""
    pool = _GENERIC + _STYLE_PHRASES.get(drawn.style, [])
    picks = rng.choice(len(pool), size=n, replace=n > len(pool))
    values = {"shape": drawn.shape, "colour": drawn.colour, "bg": drawn.background}
    return [pool[i].format(**values) for i in picks]


# -- writing domains -----------------------------------------------------------------------------

@dataclasses.dataclass
class WorldConfig:
    """What `write_world` generates."""

    out: Path = Path("runs/toyworld/world")  # root; domains go to OUT/<domain>/<class>/<i>.png
    domains: tuple[str, ...] = DOMAINS  # styles written as domains
    per_class: int = 60  # images per class per domain
    size: int = DEFAULT_SIZE  # side of every image in pixels
    seed: int = 0  # the world's seed; domains never share an image stream with pre-training
    workers: int = 2  # rendering processes

    def validate(self) -> None:
        problems = [f"unknown style {d!r}: expected some of {', '.join(STYLES)}"
                    for d in self.domains if d not in STYLES]
        if not self.domains:
            problems.append("no domains given")
        if self.per_class < 1:
            problems.append(f"per_class {self.per_class} is out of range: expected >= 1")
        if not 16 <= self.size <= 512:
            problems.append(f"size {self.size} is out of range: expected 16..512")
        if self.workers < 1:
            problems.append(f"workers {self.workers} is out of range: expected >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    def manifest(self) -> dict:
        return {"domains": list(self.domains), "classes": list(CLASSES), "per_class": self.per_class,
                "size": self.size, "seed": self.seed, "version": WORLD_VERSION}


# Bump when rendering changes, so an old world on disk is regenerated rather than reused.
WORLD_VERSION = 1
MANIFEST = "world.json"


def _write_one(job: tuple[Path, str, str, int, int, int]) -> None:
    root, style, shape, index, seed, size = job
    path = root / style / shape / f"{index:04d}.png"
    render(style, shape, index, seed, size).image.save(path, optimize=False)


def write_world(cfg: WorldConfig) -> Path:
    """Write the domains as ImageFolder trees (reusing an identical world already there)."""
    cfg.validate()
    root = Path(cfg.out)
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == cfg.manifest():
        logger.info("world at %s is up to date", root)
        return root
    jobs = []
    for style in cfg.domains:
        for shape in CLASSES:
            (root / style / shape).mkdir(parents=True, exist_ok=True)
            jobs += [(root, style, shape, i, cfg.seed, cfg.size) for i in range(cfg.per_class)]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_one(job)
    manifest.write_text(json.dumps(cfg.manifest(), indent=2) + "\n")
    logger.info("wrote %d images to %s", len(jobs), root)
    return root


def contact_sheet(styles: Sequence[str], seed: int = 0, size: int = DEFAULT_SIZE) -> Image.Image:
    """One row per style, one column per class: a picture of the world for the README."""
    sheet = Image.new("RGB", (size * len(CLASSES), size * len(styles)), "white")
    for r, style in enumerate(styles):
        for c, shape in enumerate(CLASSES):
            sheet.paste(render(style, shape, 0, seed, size).image, (c * size, r * size))
    return sheet


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.world",
                                description="Write the toy world's domains as ImageFolder trees.")
    p.add_argument("--out", type=Path, default=WorldConfig.out, help="default: %(default)s")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), help=f"styles to write ({', '.join(STYLES)})")
    p.add_argument("--per-class", type=int, default=WorldConfig.per_class)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--contact-sheet", type=Path, metavar="PNG",
                   help="also write one example of every class in every style to this file")
    args = p.parse_args(argv)
    cfg = WorldConfig(args.out, tuple(args.domains), args.per_class, args.size, args.seed, args.workers)
    try:
        root = write_world(cfg)
    except (ValueError, OSError) as e:
        print(f"world: error: {e}", file=sys.stderr)
        return 2
    print(f"world: {len(cfg.domains)} domains x {len(CLASSES)} classes x {cfg.per_class} images in {root}")
    if args.contact_sheet:
        contact_sheet(STYLES, args.seed, args.size).save(args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
