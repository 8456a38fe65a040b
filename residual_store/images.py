"""Image decoding shared by the trainer and the server: one set of formats, one set of pixels.

What the trainer trains on is exactly what the server accepts: `FORMATS` (Pillow's decoders for
JPEG, PNG and WebP; no other decoder runs on an upload). A folder scan takes every file with an
image extension (`EXTENSIONS`, which also names BMP, GIF and TIFF) as an image, so one the
server would refuse is reported as unreadable, naming its format, not ignored. `to_rgb8` turns
any decoded image into the 8-bit RGB the evaluation transform expects:

- the first frame of an animated file (WebP, APNG);
- the EXIF orientation applied (a phone's portrait JPEG is upright, as any viewer shows it);
- 16-bit and 32-bit integer greys (PNG/TIFF modes I;16*, I) scaled from their full range to
  0-255 (value * 255 / 65535), floats (mode F) from [0, 1] when they lie there, else clipped
  to 0-255; Pillow's own convert("RGB") clips them instead, which turns a 16-bit image white;
- everything else through Pillow's convert("RGB") (alpha dropped, palettes expanded).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP")
FORMAT_NAMES = "JPEG, PNG or WebP"
EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp",
                        ".dib", ".gif", ".tif", ".tiff"})

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

MAX_TEXT_CHUNK = 64 << 10  # bytes of one decompressed PNG text chunk (Pillow: 1 MiB)
MAX_TEXT_MEMORY = 256 << 10  # bytes of all text chunks of one PNG (Pillow: 64 MiB)


def limit_decoder(max_pixels: int | None = None) -> None:
    """Pillow's own limits for untrusted images (process-wide): truncated files stay errors,
    PNG text chunks are bounded (Pillow's defaults let a 70 KB file inflate 64 MiB of text per
    image), and with `max_pixels` (uda-serve's --max-image-pixels) Image.MAX_IMAGE_PIXELS
    follows it, so Pillow warns above it and raises DecompressionBombError above twice it,
    even on a path that skipped the server's own header check."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_MEMORY
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels


def is_bomb(error: BaseException) -> bool:
    """Whether Pillow refused an image for its size rather than for corrupt data: a
    decompression bomb, or PNG text beyond MAX_TEXT_CHUNK / MAX_TEXT_MEMORY."""
    if isinstance(error, Image.DecompressionBombError):
        return True
    return isinstance(error, ValueError) and "MAX_TEXT_" in str(error)


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image of FORMATS; the message is one line without object
    reprs (Pillow's own names an `<_io.BytesIO object at 0x...>`)."""


def is_image_name(path: str | Path) -> bool:
    """Whether a file's extension is one of the image formats (case-insensitive)."""
    return Path(path).suffix.lower() in EXTENSIONS


def open_image(data: bytes) -> Image.Image:
    """Open (lazily: only the header is read) an image of FORMATS; ImageDecodeError otherwise."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"not a {FORMAT_NAMES} image") from e


def to_rgb8(image: Image.Image) -> Image.Image:
    """The first frame of `image`, upright (EXIF orientation), as 8-bit RGB; see the module
    docstring for how deeper pixels are scaled."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        finite = pixels[np.isfinite(pixels)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            pixels = pixels * 255.0
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Bytes of an image of FORMATS -> a loaded 8-bit RGB image (see to_rgb8).

    ImageDecodeError for bytes that are not such an image; a truncated or corrupt file raises
    what Pillow raises (OSError, SyntaxError, ValueError...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with open_image(data) as image:
            return to_rgb8(image)


def read_image(path: str | Path) -> Image.Image:
    """decode_local of a file's bytes."""
    return decode_local(Path(path).read_bytes())


def decode_local(data: bytes) -> Image.Image:
    """decode_image of trusted local bytes (the trainer's files, not uploads): a file of another
    format says which (Pillow identifies it from its header), so a folder of TIFFs reads as such."""
    try:
        return decode_image(data)
    except ImageDecodeError:
        try:
            with Image.open(io.BytesIO(data)) as other:
                found = other.format
        except Exception:  # Pillow raises many types; the first message stands
            found = None
        if found:
            raise ImageDecodeError(f"a {found} image: uda-serve accepts only {FORMAT_NAMES}, "
                                   "so the trainer does too; convert it (e.g. to PNG)") from None
        raise
