"""The teacher's pre-training data: digits typeset in the fonts installed on this machine.

Neither MNIST nor the photographs the target is made of are ever drawn here. A picture is one
digit in one font at a random size, rotation, stroke weight and position, in a random colour on
a plain, noisy, gradient or blotchy background of random colours (toyworld's texture helpers),
with captions such as `a photo of the number: "7"` or `a red 7 on a noisy blue background.`

Fonts are the .ttf/.otf files fontconfig lists (`fc-list`) or that lie under the usual font
folders, plus the ones matplotlib bundles (DejaVu, STIX, Computer Modern). A font is kept when
it draws all ten digits, no two alike, and they look like digits: cropped and scaled to 16x16,
at least 8 of its 10 glyphs must correlate best with the median glyph of the same digit over
all the fonts (which drops symbol fonts such as cmsy10, whose "0".."9" are other signs, and
keeps italics whose 1 looks a little like a 7). Fonts that
name the same face (DejaVu Sans twice) count once.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench.toyworld.world import COLOURS, gradient, pattern

logger = logging.getLogger(__name__)

DIGITS = tuple(str(d) for d in range(10))
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")
CANVAS = 64  # pictures are drawn at this size and scaled down to the pool's
BACKGROUNDS = ("plain", "noisy", "gradient", "blotchy")
_TEMPLATE = 16  # glyph side for the "looks like digits" check
_MATCHES = 8  # glyphs of ten that must look like their digit


@dataclasses.dataclass(frozen=True)
class Font:
    path: str
    name: str  # "DejaVu Sans Bold"


# -- finding fonts -------------------------------------------------------------------------------

def candidate_files() -> list[str]:
    """Every .ttf/.otf that fontconfig or the usual folders know, and matplotlib's own."""
    files: set[str] = set()
    if shutil.which("fc-list"):
        out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True,
                             check=False, timeout=60).stdout
        files.update(line.strip() for line in out.splitlines())
    for folder in FONT_DIRS:
        for ext in ("ttf", "otf"):
            files.update(glob.glob(os.path.join(os.path.expanduser(folder), "**", f"*.{ext}"), recursive=True))
    try:
        import matplotlib

        files.update(glob.glob(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "*.ttf")))
    except ImportError:
        pass
    return sorted(f for f in files if f.lower().endswith((".ttf", ".otf")) and os.path.isfile(f))


def _glyphs(path: str) -> np.ndarray | None:
    """The ten digits of a font as float (10, 16, 16) ink maps, or None when one is blank."""
    try:
        font = ImageFont.truetype(path, 40)
    except OSError:
        return None
    out = []
    for d in DIGITS:
        im = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(im).text((32, 32), d, font=font, fill=255, anchor="mm")
        box = im.getbbox()
        if box is None:
            return None
        out.append(np.asarray(im.crop(box).resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR), np.float64) / 255)
    return np.stack(out)


@functools.lru_cache(maxsize=1)
def find_fonts() -> tuple[Font, ...]:
    """The usable fonts, sorted by name (see the module docstring for the rules)."""
    faces: dict[str, tuple[str, np.ndarray]] = {}
    for path in candidate_files():
        glyphs = _glyphs(path)
        if glyphs is None:
            continue
        name = " ".join(ImageFont.truetype(path, 12).getname())
        faces.setdefault(name, (path, glyphs))
    if not faces:
        return ()
    stack = np.stack([g for _, g in faces.values()])  # (fonts, 10, 16, 16)
    template = np.median(stack, axis=0).reshape(10, -1)
    template = template - template.mean(axis=1, keepdims=True)
    keep = []
    for name, (path, glyphs) in sorted(faces.items()):
        flat = glyphs.reshape(10, -1)
        flat = flat - flat.mean(axis=1, keepdims=True)
        distinct = all(np.abs(flat[i] - flat[j]).max() > 0.1 for i in range(10) for j in range(i))
        score = flat @ template.T  # (digit of this font, template digit)
        if distinct and int((score.argmax(axis=1) == np.arange(10)).sum()) >= _MATCHES:
            keep.append(Font(path, name))
        else:
            logger.info("font %s (%s) left out: its digits do not look like digits", name, path)
    return tuple(keep)


def fonts_digest(fonts: Sequence[Font]) -> list[str]:
    """What the teacher's sidecar records: each font's name and a digest of its file."""
    out = []
    for f in fonts:
        digest = hashlib.sha256(Path(f.path).read_bytes()).hexdigest()[:12]
        out.append(f"{f.name} {digest}")
    return out


# -- drawing -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Picture:
    image: Image.Image  # RGB, size x size
    digit: str
    font: str
    colour: str  # name of the digit's colour
    background: str  # "plain" | "noisy" | "gradient" | "blotchy"
    background_colour: str


def picture_rng(seed: int, digit: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"fontdigit|{seed}|{digit}|{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _named_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> tuple[str, np.ndarray]:
    """A named colour (jittered); with `avoid`, one that stands out from it."""
    names = sorted(COLOURS)
    best = None
    for _ in range(12):
        name = names[int(rng.integers(len(names)))]
        rgb = np.clip(np.asarray(COLOURS[name], np.float64) + rng.normal(0, 18, 3), 0, 255)
        d = 999.0 if avoid is None else float(np.linalg.norm(rgb - avoid))
        if best is None or d > best[0]:
            best = (d, name, rgb)
        if d > 120:
            break
    return best[1], best[2]


def _background(kind: str, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    px = CANVAS
    other = np.clip(base + rng.normal(0, 60, 3), 0, 255)
    if kind == "plain":
        return np.broadcast_to(base, (px, px, 3)).copy()
    if kind == "noisy":
        scale = int(rng.choice([1, 2, 4]))  # pixel noise or coarser speckles
        noise = rng.normal(0, rng.uniform(15, 45), (px // scale, px // scale, 3))
        noise = np.repeat(np.repeat(noise, scale, axis=0), scale, axis=1)
        return base + noise
    if kind == "gradient":
        return gradient(px, base, other, rng)
    return pattern("blotchy", px, base, other, rng)


def draw(digit: str, font: Font, rng: np.random.Generator, size: int) -> Picture:
    """One picture of `digit`; every random choice comes from `rng`."""
    bg_name, bg_rgb = _named_colour(rng)
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    fg_name, fg_rgb = _named_colour(rng, avoid=bg_rgb)
    background = _background(kind, rng, bg_rgb)
    height = rng.uniform(0.55, 1.2) * CANVAS  # font size; a digit is about 0.7 of it tall
    stroke = int(rng.integers(0, 4))
    face = ImageFont.truetype(font.path, max(8, round(height)))
    glyph = Image.new("L", (CANVAS * 2, CANVAS * 2), 0)
    ImageDraw.Draw(glyph).text((CANVAS, CANVAS), digit, font=face, fill=255, anchor="mm",
                               stroke_width=stroke, stroke_fill=255)
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    glyph = glyph.crop(glyph.getbbox() or (0, 0, 1, 1))
    fit = min(1.0, 0.95 * CANVAS / max(glyph.size))  # a large, rotated glyph still fits
    if fit < 1.0:
        glyph = glyph.resize((max(1, round(glyph.width * fit)), max(1, round(glyph.height * fit))), Image.BILINEAR)
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    x = int(rng.integers(0, CANVAS - glyph.width + 1))
    y = int(rng.integers(0, CANVAS - glyph.height + 1))
    mask.paste(glyph, (x, y))
    if rng.uniform() < 0.3:
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    m = (np.asarray(mask, np.float64) / 255)[..., None]
    arr = background * (1 - m) + fg_rgb * m
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((size, size), Image.LANCZOS)
    return Picture(image, digit, font.name, fg_name, kind, bg_name)


# -- captions ------------------------------------------------------------------------------------

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CAPTIONS = (
    'a photo of the number: "{digit}"',
    'a photo of the number: "{digit}"',
    "the number {digit}.",
    "the digit {digit}.",
    'a picture of the number "{digit}".',
    "the number {word}: {digit}.",
    "a {colour} {digit}.",
    "a {digit} on a {background} background.",
)


def captions(picture: Picture, rng: np.random.Generator, n: int) -> list[str]:
    """n captions of a picture; the zero-shot prompt's form is the likeliest."""
    values = {"digit": picture.digit, "colour": picture.colour, "bg_colour": picture.background_colour,
              "background": picture.background, "word": WORDS[int(picture.digit)], "font": picture.font.lower()}
    picks = rng.choice(len(_CAPTIONS), size=n, replace=n > len(_CAPTIONS))
    return [_CAPTIONS[i].format(**values) for i in picks]


def sheet(fonts: Sequence[Font], seed: int = 0, size: int = 32, per_row: int = 16) -> Image.Image:
    """Pre-training pictures, a row per digit, for looking at."""
    out = Image.new("RGB", (size * per_row, size * len(DIGITS)), "white")
    for r, digit in enumerate(DIGITS):
        for k in range(per_row):
            rng = picture_rng(seed, digit, k)
            font = fonts[int(rng.integers(len(fonts)))]
            out.paste(draw(digit, font, rng, size).image, (k * size, r * size))
    return out
