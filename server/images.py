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

from residual_store.images import FORMAT_NAMES, FORMATS, to_rgb8
from residual_store.preprocess import eval_transform
from server.errors import ImageRejected

logger = logging.getLogger(__name__)

class ImageDecoder:
    """bytes -> normalised (3, S, S) tensors, with the server's upload limits."""

    def __init__(self, size: int, max_bytes: int, max_pixels: int, workers: int = 4):
        self.size = size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.transform = eval_transform(size)
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
        except Image.DecompressionBombError as e:
            raise ImageRejected("too_large", f"{name}: {e}") from e
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise ImageRejected("corrupt", f"{name} is a corrupt or truncated {_fmt(blob)} image: {e}") from e

    def _pixels(self, image: Image.Image, name: str) -> torch.Tensor:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected("corrupt", f"{name} has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageRejected("too_large", f"{name} is {width}x{height} = {width * height} pixels, "
                                             f"the limit is {self.max_pixels} (--max-image-pixels)")
        return self.transform(to_rgb8(image))  # the trainer's pixels: residual_store.images

    async def decode_many(self, blobs: list[tuple[str, bytes]]) -> torch.Tensor:
        """Decode (name, bytes) uploads concurrently in the pool; (n, 3, S, S)."""
        loop = asyncio.get_running_loop()
        tensors = await asyncio.gather(*(loop.run_in_executor(self._pool, self.decode, blob, name)
                                         for name, blob in blobs))
        return torch.stack(tensors)

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
