"""Issue 6, point 7: upload abuse.

Oversized bodies get 413 before the body is even read; pixel bombs, multi-frame files, truncated
JPEGs, formats other than JPEG/PNG/WebP and too many multipart parts get 4xx, never 500; only
the first frame of an animated file is used; the server's peak memory stays bounded.
"""
from __future__ import annotations

import io
import socket
import struct
import zlib
from pathlib import Path

import httpx
import pytest
import reliability_support as rs
from PIL import Image

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration

MAX_IMAGE_BYTES = 200_000
MAX_BATCH = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    v1 = rs.make_version("A", 1)
    open_store(str(root)).publish("A", v1.blob)
    cfg = ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0, max_batch=MAX_BATCH,
                      max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=1_000_000, request_timeout=20)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").status_code == 200
        yield srv, http, v1


def _post(http, blob: bytes, ctype: str = "image/png") -> httpx.Response:
    return http.post("/predict?task=A", content=blob, headers={"content-type": ctype})


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    blob = bytearray(rs.IMAGES[1])  # a JPEG
    sof = blob.find(b"\xff\xc0")
    blob[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(blob)


def _frames(fmt: str, **kw) -> bytes:
    frames = [Image.open(io.BytesIO(b)).convert("RGB").resize((40, 40)) for b in rs.IMAGES]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **kw)
    return buf.getvalue()


def _raw_request(url: str, head: str, body: bytes) -> bytes:
    """Send a request by hand and return what the server answers (the status line first)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            part = s.recv(65536)
            if not part:
                break
            data += part
        return data


def test_oversized_body_is_413_before_the_body_is_read(served):
    srv, http, _ = served
    # Announce 1 GB and send 10 bytes: the answer can only come from the header check.
    head = ("POST /predict?task=A HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            "Content-Length: 1000000000\r\n")
    answer = _raw_request(srv.url, head, b"0123456789")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Without a length (chunked), reading stops at the limit.
    big = (b"\x89PNG" + b"\0" * 65536 for _ in range(10))
    resp = http.post("/predict?task=A", content=big, headers={"content-type": "image/png"})
    assert resp.status_code == 413 and resp.json()["error"] == "payload too large"
    files = [("file", (f"{i}.png", b"\0" * (MAX_IMAGE_BYTES // 2), "image/png")) for i in range(2 * MAX_BATCH + 2)]
    assert http.post("/predict?task=A", files=files).status_code == 413


BOMBS = {
    "png_100k_x_100k_header": _png_header(100_000, 100_000),
    "jpeg_65k_x_65k_header": _jpeg_claiming(65_000, 65_000),
}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_pixel_bombs_are_413(served, kind):
    resp = _post(served[1], BOMBS[kind])
    assert resp.status_code == 413 and "pixels" in resp.json()["detail"], resp.text


def _fits() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                   16", "NAXIS2  =                   16", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + b"\0" * 2880


def _pillow(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(rs.IMAGES[0])).convert("RGB").save(buf, fmt, **kw)
    return buf.getvalue()


def _gd() -> bytes:  # GD 2.x uncompressed truecolour: signature, size, no palette
    return b"\xff\xfe" + struct.pack(">HH", 4, 4) + b"\x01" + b"\0" * 4 + b"\0" * 64


OTHER_FORMATS = {
    "gif_multi_frame": _frames("GIF"),
    "fits": _fits(),
    "gd": _gd(),
    "pdf": _pillow("PDF"),
    "bmp": _pillow("BMP"),
    "tiff": _pillow("TIFF"),
    "ico": _pillow("ICO"),
    "eps_ghostscript_bait": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "tga": _pillow("TGA"),
}


@pytest.mark.parametrize("kind", sorted(OTHER_FORMATS))
def test_formats_outside_jpeg_png_webp_are_415(served, kind):
    resp = _post(served[1], OTHER_FORMATS[kind], "image/png")
    assert resp.status_code == 415, resp.text
    assert resp.json()["error"] == "unsupported media type"


def test_truncated_jpeg_and_png_are_400(served):
    for blob in (rs.IMAGES[1][: len(rs.IMAGES[1]) // 2], rs.IMAGES[0][: len(rs.IMAGES[0]) - 30]):
        resp = _post(served[1], blob, "image/jpeg")
        assert resp.status_code == 400 and resp.json()["error"] == "corrupt image", resp.text


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"lossless": True}), ("MPO", {})])
def test_animated_and_multi_picture_files_use_the_first_frame(served, fmt, kw):
    srv, http, v1 = served
    blob = _frames(fmt, **kw)
    with Image.open(io.BytesIO(blob)) as im:
        assert getattr(im, "n_frames", 1) == len(rs.IMAGES)
        first = io.BytesIO()
        im.seek(0)
        im.convert("RGB").save(first, "PNG")
    resp = _post(http, blob)
    assert resp.status_code == 200, resp.text
    expected = rs.reference_first_frame(v1, first.getvalue())
    got = rs.scores_of(resp, expected.numel())
    assert bool((got - expected).abs().max() <= 1e-5), (got, expected)


def test_more_multipart_parts_than_the_limit_are_4xx(served):
    _, http, _ = served
    files = [("file", (f"{i}.png", rs.IMAGES[0], "image/png")) for i in range(MAX_BATCH + 1)]
    resp = http.post("/predict?task=A", files=files)
    assert resp.status_code == 413, resp.text
    fields = {f"f{i}": "x" for i in range(40)}  # many non-file fields
    resp = http.post("/predict?task=A", data=fields, files=[("file", ("a.png", rs.IMAGES[0], "image/png"))])
    assert 400 <= resp.status_code < 500, resp.text
    many = [("file", (f"{i}.png", b"", "image/png")) for i in range(5000)]
    resp = http.post("/predict?task=A", files=many)
    assert 400 <= resp.status_code < 500, resp.text


def test_memory_stays_bounded_under_abuse(served):
    """The server runs in this process: its peak RSS over a round of every abuse above."""
    _, http, v1 = served
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")

    def kib(field):
        return next(int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith(field))

    before = kib("VmRSS:")
    for _ in range(3):
        for blob in [*BOMBS.values(), *OTHER_FORMATS.values()]:
            assert 400 <= _post(http, blob).status_code < 500
    grown_mib = (kib("VmHWM:") - before) / 1024
    # A decoded 100k x 100k bomb alone would be 10 GB; the limits keep it to the uploads.
    assert grown_mib < 100, f"peak RSS grew {grown_mib:.0f} MiB"
    resp = rs.predict(http, "A")
    assert resp.status_code == 200 and rs.matches(resp, v1)
