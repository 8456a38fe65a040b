"""Decoding and preprocessing uploads, in a thread pool off the model thread.

Only JPEG, PNG and WebP are decoded (`residual_store.images.FORMATS`, which is also all the
trainer trains on; Pillow is told so, no other decoder runs). Limits: bytes per upload and
width x height, checked from the header before any pixel is decoded, so a decompression bomb
costs nothing. Images above PROCESS_PIXELS are decoded in child processes that are killed
when their request times out or its client leaves (server/decode_process.py), smaller ones
in a thread. The pixels go through
`residual_store.images.to_rgb8` (first frame, EXIF orientation, 16-bit scaled to 8-bit, RGB)
and `residual_store.preprocess.eval_transform`, exactly as the trainer reads its images, so
served scores equal the trainer's.
"""
from __future__ import annotations

import asyncio
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from residual_store.images import FORMAT_NAMES, ImageDecodeError, limit_decoder, open_image
from residual_store.preprocess import eval_transform
from server.decode_process import PROCESS_PIXELS, DecodeProcesses, decode_rgb, rejection
from server.errors import ImageRejected
from server.torch_threads import one_core

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
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uda-decode",
                                        initializer=one_core)
        self._processes = DecodeProcesses(min(workers, 2), size, max_pixels)

    def decode(self, blob: bytes, name: str = "image") -> torch.Tensor:
        """One upload to a tensor; ImageRejected(kind) names what is wrong with it."""
        if not blob:
            raise ImageRejected("bad_request", f"{name} is empty")
        if len(blob) > self.max_bytes:
            raise ImageRejected("too_large", f"{name} has {len(blob)} bytes, the limit is "
                                             f"{self.max_bytes} (--max-image-bytes)")
        self.probe(blob, name)
        return self.transform(decode_rgb(blob, name))  # the trainer's pixels: residual_store.images

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
            raise rejection(e, name, blob) from e
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
        each = await loop.run_in_executor(self._pool, self._probe_all, blobs)
        pixels = sum(each)
        if self.max_request_pixels is not None and pixels > self.max_request_pixels:
            raise ImageRejected("too_large", f"the {len(blobs)} images of this request have "
                                             f"{pixels} pixels together, the limit is "
                                             f"{self.max_request_pixels} (--max-request-pixels)")
        tensors = await asyncio.gather(*(self._decode_one(blob, name, n)
                                         for (name, blob), n in zip(blobs, each)))
        return torch.stack(tensors)

    async def _decode_one(self, blob: bytes, name: str, pixels: int) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if pixels <= PROCESS_PIXELS:
            return await loop.run_in_executor(self._pool, self.decode, blob, name)
        rgb = await self._processes.decode(blob, name)  # killed if this call is cancelled
        return await loop.run_in_executor(self._pool, self.transform, rgb)

    def _probe_all(self, blobs: list[tuple[str, bytes]]) -> list[int]:
        return [self.probe(blob, name) for name, blob in blobs]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._processes.close()

