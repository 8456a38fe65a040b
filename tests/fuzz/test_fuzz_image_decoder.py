"""Issue 6, point 13: hypothesis fuzzing of the server's image decoder.

Any upload ends in a (3, S, S) tensor or an ImageRejected naming a client error (the HTTP edge
turns it into 400/413/415), never another exception (a 500). Inputs: random bytes, damaged
JPEG/PNG/WebP/GIF/BMP/TIFF files, and valid headers that claim huge sizes.
"""
from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.errors import ImageRejected
from server.images import ImageDecoder
from server.synthetic import image_bytes

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = {"not_image", "corrupt", "too_large", "bad_request"}
SEEDS = {fmt: image_bytes(7, size=24, fmt=fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")}


@pytest.fixture(scope="module")
def decoder():
    d = ImageDecoder(32, max_bytes=1 << 20, max_pixels=250_000, workers=1)
    yield d
    d.close()


def _decode(decoder: ImageDecoder, blob: bytes) -> None:
    try:
        x = decoder.decode(blob, "upload")
    except ImageRejected as e:
        assert e.kind in KINDS and str(e)
        return
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and bool(torch.isfinite(x).all())


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_random_bytes(decoder, blob):
    _decode(decoder, blob)


@FUZZ
@given(fmt=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=10),
       cut=st.none() | st.integers(0, 4096))
def test_damaged_images(decoder, fmt, edits, cut):
    blob = bytearray(SEEDS[fmt])
    for pos, value in edits:
        blob[pos % len(blob)] = value
    _decode(decoder, bytes(blob[:cut]))


def _png(width: int, height: int, body: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1), body=st.binary(max_size=64))
def test_png_headers_of_any_size(decoder, width, height, body):
    _decode(decoder, _png(width, height, body))


def _jpeg_claiming(width: int, height: int) -> bytes:
    blob = bytearray(SEEDS["JPEG"])
    sof = blob.find(b"\xff\xc0")
    blob[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(blob)


@FUZZ
@given(width=st.integers(0, 65535), height=st.integers(0, 65535))
def test_jpeg_headers_of_any_size(decoder, width, height):
    _decode(decoder, _jpeg_claiming(width, height))


def test_bombs_are_too_large_before_any_pixel_is_decoded(decoder):
    for blob in (_jpeg_claiming(65000, 65000), _png(100_000, 100_000)):
        with pytest.raises(ImageRejected) as e:
            decoder.decode(blob)
        assert e.value.kind == "too_large"


def test_a_png_text_chunk_bomb_is_refused(decoder):
    buf = io.BytesIO()
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "A" * (64 << 20), zip=True)  # 64 MiB when inflated, ~64 KiB on the wire
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=info)
    _decode(decoder, buf.getvalue())
