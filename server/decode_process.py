"""Decoding big images in worker processes that are killed when nobody waits any more.

A thread cannot be stopped: a decode that overruns --request-timeout, or whose client hung up,
kept its pool thread (and up to a gigabyte) busy until Pillow finished. Images above
PROCESS_PIXELS are decoded here instead, in a few long-lived child processes
(`python -m server.decode_process`, importing Pillow and numpy only, not torch): the parent
sends the bytes over a pipe and gets back the image resized to the model's S x S as 8-bit RGB
(S*S*3 bytes). When the awaiting request is cancelled (its timeout, a client that left, a
shutdown) the child is killed at once, the thread waiting on its pipe sees EOF, and the slot is
free for the next image; a fresh child is started when one is next needed.

Pixels are the server's own: `residual_store.images.to_rgb8`, then Pillow's bilinear resize to
(S, S), which is what `eval_transform`'s Resize((S, S)) does (on an S x S image it is a copy),
so scores equal the in-thread path's and the trainer's.

Protocol on the child's stdin/stdout: request = 4-byte big-endian length + image bytes; reply =
b"K" + length + RGB bytes, or b"E" + length + JSON {"kind", "message"} (ImageRejected's).
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from residual_store.images import FORMAT_NAMES, FORMATS, is_bomb, limit_decoder, to_rgb8
from server.errors import ImageRejected

logger = logging.getLogger(__name__)

# Below this many pixels an image decodes in well under a second in the caller's thread (a
# 1 MP PNG in ~20 ms, a 64-scan progressive JPEG in ~0.3 s); above it, in a child process.
PROCESS_PIXELS = 1 << 20
_LEN = struct.Struct(">I")


# -- the shared decode (child and in-thread path) ------------------------------------------------


def decode_rgb(blob: bytes, name: str = "image") -> Image.Image:
    """Bytes of an upload -> its 8-bit RGB pixels (to_rgb8), or ImageRejected naming why."""
    try:
        with warnings.catch_warnings():
            # The server's own pixel limit answers first; Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob), formats=FORMATS) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise ImageRejected("corrupt", f"{name} has no pixels ({width}x{height})")
                return to_rgb8(image)
    except ImageRejected:
        raise
    except UnidentifiedImageError as e:
        raise ImageRejected("not_image", f"{name} is not a {FORMAT_NAMES} image") from e
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
            MemoryError) as e:
        raise rejection(e, name, blob) from e


def rejection(error: BaseException, name: str, blob: bytes) -> ImageRejected:
    """ImageRejected for what Pillow raised on `blob`: 413 for a bomb, 400 for corrupt data."""
    if is_bomb(error):
        return ImageRejected("too_large", f"{name}: {error}")
    return ImageRejected("corrupt", f"{name} is a corrupt or truncated {image_format(blob)} image: {error}")


def image_format(blob: bytes) -> str:
    if blob[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if blob[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return "WebP"
    return "image"


# -- the parent's side ---------------------------------------------------------------------------


class _Child:
    """One decode process and its pipes."""

    def __init__(self, size: int, max_pixels: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.decode_process", str(size), str(max_pixels)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def roundtrip(self, blob: bytes) -> tuple[bytes, bytes]:
        """(status, payload) of one image; (b"X", b"") when the child died (was killed)."""
        try:
            self.proc.stdin.write(_LEN.pack(len(blob)) + blob)
            self.proc.stdin.flush()
            head = _read_exactly(self.proc.stdout, 5)
            return head[:1], _read_exactly(self.proc.stdout, _LEN.unpack(head[1:])[0])
        except (OSError, ValueError, EOFError):
            return b"X", b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class DecodeProcesses:
    """Up to `workers` child processes decoding images to (size, size) RGB; started on first
    use, killed when the request waiting on one is cancelled, replaced on the next use."""

    def __init__(self, workers: int, size: int, max_pixels: int):
        self.size = size
        self.max_pixels = max_pixels
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._async_slots: asyncio.Semaphore | None = None
        self._workers = workers
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uda-decode-proc")
        self._closed = False
        self.killed = 0  # children killed because nobody waited for their image

    async def decode(self, blob: bytes, name: str = "image") -> Image.Image:
        """The (size, size) RGB pixels of `blob`, decoded in a child; ImageRejected as in the
        in-thread path. Cancelling this call kills the child at once."""
        if self._async_slots is None:
            self._async_slots = asyncio.Semaphore(self._workers)
        async with self._async_slots:
            child = self._take()
            job = self._threads.submit(child.roundtrip, blob)
            try:
                status, payload = await asyncio.wrap_future(job)
            except asyncio.CancelledError:
                self.killed += 1
                child.kill()  # the waiting thread reads EOF and the slot is free
                raise
            self._give_back(child, healthy=status in (b"K", b"E"))
        if status == b"K":
            return Image.frombytes("RGB", (self.size, self.size), payload)
        if status == b"E":
            error = json.loads(payload)  # its message names the upload "image"
            raise ImageRejected(error["kind"], name + error["message"].removeprefix("image"))
        raise ImageRejected("corrupt", f"{name} could not be decoded (the decoder process died)")

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
                child.kill()
        return _Child(self.size, self.max_pixels)

    def _give_back(self, child: _Child, healthy: bool) -> None:
        with self._lock:
            if healthy and not self._closed:
                self._idle.append(child)
                return
        child.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError("decoder process closed its pipe")
    return data


# -- the child's side ----------------------------------------------------------------------------


def _serve(size: int, max_pixels: int) -> None:
    limit_decoder(max_pixels)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_LEN.size)
        if len(head) != _LEN.size:
            return  # the parent closed the pipe
        blob = _read_exactly(stdin, _LEN.unpack(head)[0])
        try:
            rgb = decode_rgb(blob, "image").resize((size, size), Image.BILINEAR)
            status, payload = b"K", rgb.tobytes()
        except ImageRejected as e:
            status, payload = b"E", json.dumps({"kind": e.kind, "message": str(e)}).encode()
        stdout.write(status + _LEN.pack(len(payload)) + payload)
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
