"""Decoding and preprocessing uploads, in a thread pool off the model thread.

Only JPEG, PNG and WebP are decoded (`residual_store.images.FORMATS`, which is also all the
trainer trains on; Pillow is told so, no other decoder runs). Limits: bytes per upload and
width x height, checked from the header before any pixel is decoded, so a decompression bomb
costs nothing. The pixels go through
`residual_store.images.to_rgb8` (first frame, EXIF orientation, 16-bit scaled to 8-bit, RGB)
and `residual_store.preprocess.eval_transform`, exactly as the trainer reads its images, so
served scores equal the trainer's.
"""
from __future__ import annotations

import asyncio
import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image, UnidentifiedImageError

from residual_store.images import (FORMAT_NAMES, FORMATS, ImageDecodeError, is_bomb, limit_decoder,
                                   open_image, to_rgb8)
from residual_store.preprocess import eval_transform
from server.errors import ImageRejected

logger = logging.getLogger(__name__)

MAX_JPEG_SCANS = 64  # progressive JPEGs have about 10; each repeated scan is decoded again


class ImageDecoder:
    """bytes -> normalised (3, S, S) tensors, with the server's upload limits.

    Besides bytes and pixels per image (--max-image-bytes, --max-image-pixels): the longest side
    (--max-image-side) and the aspect ratio (--max-image-aspect), since a 1 x 40,000,000 PNG
    costs seconds and gigabytes row by row; the scans of a JPEG (MAX_JPEG_SCANS), since a
    progressive JPEG that repeats one scan 200,000 times is decoded that many times; and the
    pixels of one request together (--max-request-pixels). All are checked from the headers
    before any pixel of the request is decoded."""

    def __init__(self, size: int, max_bytes: int, max_pixels: int, workers: int = 4,
                 max_side: int = 16384, max_aspect: float = 100.0,
                 max_request_pixels: int | None = None):
        self.size = size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.max_aspect = max_aspect
        self.max_request_pixels = max_request_pixels
        self.transform = eval_transform(size)
        limit_decoder(max_pixels)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uda-decode")

    def decode(self, blob: bytes, name: str = "image") -> torch.Tensor:
        """One upload to a tensor; ImageRejected(kind) names what is wrong with it."""
        if not blob:
            raise ImageRejected("bad_request", f"{name} is empty")
        if len(blob) > self.max_bytes:
            raise ImageRejected("too_large", f"{name} has {len(blob)} bytes, the limit is "
                                             f"{self.max_bytes} (--max-image-bytes)")
        try:
            with warnings.catch_warnings():
                # Our own pixel limit below is the one that answers; Pillow's warning is noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(blob), formats=FORMATS) as image:
                    return self._pixels(image, name)
        except ImageRejected:
            raise
        except UnidentifiedImageError as e:
            raise ImageRejected("not_image", f"{name} is not a {FORMAT_NAMES} image") from e
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
                MemoryError) as e:
            if is_bomb(e):
                raise ImageRejected("too_large", f"{name}: {e}") from e
            raise ImageRejected("corrupt", f"{name} is a corrupt or truncated {_fmt(blob)} image: {e}") from e

    def _pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected("corrupt", f"{name} has no pixels ({width}x{height})")
        self._check_size(width, height, name)
        return self.transform(to_rgb8(image))  # the trainer's pixels: residual_store.images

    def _check_size(self, width: int, height: int, name: str) -> None:
        if width * height > self.max_pixels:
            raise ImageRejected("too_large", f"{name} is {width}x{height} = {width * height} pixels, "
                                             f"the limit is {self.max_pixels} (--max-image-pixels)")
        if max(width, height) > self.max_side:
            raise ImageRejected("too_large", f"{name} is {width}x{height}, the longest side "
                                             f"allowed is {self.max_side} (--max-image-side)")
        if max(width, height) > self.max_aspect * min(width, height):
            raise ImageRejected("too_large", f"{name} is {width}x{height}, the aspect ratio "
                                             f"allowed is at most {self.max_aspect:g}:1 (--max-image-aspect)")

    def probe(self, blob: bytes, name: str = "image") -> int:
        """The pixels of one upload, from its header only, after the per-image checks (bytes,
        size, sides, aspect, JPEG scans); ImageRejected like `decode`."""
        if not blob:
            raise ImageRejected("bad_request", f"{name} is empty")
        if len(blob) > self.max_bytes:
            raise ImageRejected("too_large", f"{name} has {len(blob)} bytes, the limit is "
                                             f"{self.max_bytes} (--max-image-bytes)")
        if blob[:3] == b"\xff\xd8\xff":
            # 0xFFDA starts a scan; inside entropy-coded data a 0xFF byte is always followed by 0.
            scans = blob.count(b"\xff\xda")
            if scans > MAX_JPEG_SCANS:
                raise ImageRejected("too_large", f"{name} is a JPEG of {scans} scans, the limit "
                                                 f"is {MAX_JPEG_SCANS}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with open_image(blob) as image:  # the header only
                    width, height = image.size
        except ImageDecodeError as e:
            raise ImageRejected("not_image", f"{name} is not a {FORMAT_NAMES} image") from e
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
                MemoryError) as e:
            if is_bomb(e):
                raise ImageRejected("too_large", f"{name}: {e}") from e
            raise ImageRejected("corrupt", f"{name} is a corrupt or truncated {_fmt(blob)} image: {e}") from e
        if width < 1 or height < 1:
            raise ImageRejected("corrupt", f"{name} has no pixels ({width}x{height})")
        self._check_size(width, height, name)
        return width * height

    async def decode_many(self, blobs: list[tuple[str, bytes]]) -> torch.Tensor:
        """Decode (name, bytes) uploads concurrently in the pool; (n, 3, S, S).

        Every header is checked first, and the pixels of all of them against
        --max-request-pixels, so nothing is decoded for a request that would be refused.
        Cancelling the call (a timeout, a client that hung up) takes its images that have not
        started decoding out of the pool's queue at once."""
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._pool, self._probe_all, blobs)
        if self.max_request_pixels is not None and pixels > self.max_request_pixels:
            raise ImageRejected("too_large", f"the {len(blobs)} images of this request have "
                                             f"{pixels} pixels together, the limit is "
                                             f"{self.max_request_pixels} (--max-request-pixels)")
        tensors = await asyncio.gather(*(loop.run_in_executor(self._pool, self.decode, blob, name)
                                         for name, blob in blobs))
        return torch.stack(tensors)

    def _probe_all(self, blobs: list[tuple[str, bytes]]) -> int:
        return sum(self.probe(blob, name) for name, blob in blobs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _fmt(blob: bytes) -> str:
    if blob[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "WebP"
    return "image"
