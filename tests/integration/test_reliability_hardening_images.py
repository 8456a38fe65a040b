"""Issue 24, item 1: decoding under a budget.

Files just under --max-image-pixels can still cost seconds and gigabytes: a 1 x 40,000,000
grayscale PNG is decoded row by row, a progressive JPEG that repeats one scan is decoded once per
scan, and 32 of either in one request held the server for two minutes. Each is refused from its
header (413) before any pixel is decoded: longest side, aspect ratio, JPEG scans, and the pixels
of a whole request; and decoding counts against --request-timeout.
"""
from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
import reliability_support as rs
from PIL import Image

from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

pytestmark = pytest.mark.integration


def _config(tmp_path_factory, **kw) -> ServeConfig:
    root = tmp_path_factory.mktemp("store")
    open_store(str(root)).publish("A", rs.make_version("A", 1).blob)
    return ServeConfig(model=rs.MODEL, pretrained="random", store=str(root), port=0,
                       preload=("A",), **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = _config(tmp_path_factory, max_request_pixels=5000, max_batch=8)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert rs.predict(http, "A").status_code == 200
        yield srv, http


def _gray_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grey PNG (a few hundred bytes per million pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\0" + b"\0" * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def _scans(jpeg: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan (SOS segment and its entropy-coded data) of a JPEG."""
    spans, i = [], 2
    while i < len(jpeg) - 1:
        marker = jpeg[i + 1]
        if marker == 0xD9:  # EOI
            break
        length = struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        end = i + 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next real marker
            while not (jpeg[end] == 0xFF and jpeg[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            spans.append((i, end))
        i = end
    return spans


def _progressive_jpeg_repeating_a_scan(times: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(rs.IMAGES[0])).convert("RGB").resize((64, 64)).save(
        buf, "JPEG", progressive=True, quality=90)
    jpeg = buf.getvalue()
    start, end = _scans(jpeg)[-1]
    return jpeg[:end] + jpeg[start:end] * times + jpeg[end:]


def _post(http, blob: bytes) -> httpx.Response:
    return http.post("/predict?task=A", content=blob, headers={"content-type": "image/png"})


@pytest.mark.parametrize("width,height,what", [(1, 100_000, "--max-image-side"),
                                                (4000, 20, "--max-image-aspect")])
def test_long_thin_images_are_refused_from_their_header(served, width, height, what):
    resp = _post(served[1], _gray_png(width, height))
    assert resp.status_code == 413 and what in resp.json()["detail"], resp.text


def test_a_jpeg_repeating_a_scan_is_refused(served):
    blob = _progressive_jpeg_repeating_a_scan(500)
    resp = served[1].post("/predict?task=A", content=blob, headers={"content-type": "image/jpeg"})
    assert resp.status_code == 413 and "scans" in resp.json()["detail"], resp.text
    plain = _progressive_jpeg_repeating_a_scan(0)  # the same progressive JPEG, each scan once
    assert served[1].post("/predict?task=A", content=plain,
                          headers={"content-type": "image/jpeg"}).status_code == 200


def test_the_pixels_of_a_whole_request_are_budgeted(served):
    srv, http = served
    image = _gray_png(40, 40)  # 1600 pixels; the budget is 5000
    files = [("file", (f"{i}.png", image, "image/png")) for i in range(4)]
    resp = http.post("/predict?task=A", files=files)
    assert resp.status_code == 413 and "--max-request-pixels" in resp.json()["detail"], resp.text
    assert http.post("/predict?task=A", files=files[:3]).status_code == 200


def test_decoding_counts_against_the_request_timeout(tmp_path_factory):
    cfg = _config(tmp_path_factory, request_timeout=1.0)
    slow = _gray_png(48, 48)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        decoder = srv.runtime.decoder
        real, release = decoder.decode, threading.Event()

        def held(blob, name="image"):
            if blob == slow:
                release.wait(30)  # a decode that takes longer than --request-timeout
            return real(blob, name)

        decoder.decode = held
        try:
            resp = _post(http, slow)
        finally:
            release.set()
        assert resp.status_code == 503 and "decoded" in resp.json()["detail"], resp.text
        time.sleep(0.1)
        assert rs.predict(http, "A").status_code == 200


def _png_with_text(chunks: int) -> bytes:
    """A 32x32 PNG carrying `chunks` zTXt chunks of ~1 MiB of text each, 1 KB compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG")
    png = buf.getvalue()
    text = chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * ((1 << 20) - 100), 9))
    return png[:33] + text * chunks + png[33:]  # after the IHDR chunk


def test_pillow_limits_follow_the_server(served):
    srv, http = served
    assert Image.MAX_IMAGE_PIXELS == srv.runtime.config.max_image_pixels
    resp = _post(http, _png_with_text(40))  # 42 KB inflating to 40 MiB of text
    assert resp.status_code == 413 and "MAX_TEXT" in resp.json()["detail"], resp.text
    assert _post(http, _png_with_text(0)).status_code == 200


def test_a_truncated_image_is_refused_even_if_pillow_was_told_to_load_them(tmp_path_factory):
    from PIL import ImageFile
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as a library imported before the server may do
    try:
        cfg = _config(tmp_path_factory)
        buf = io.BytesIO()
        Image.open(io.BytesIO(rs.IMAGES[0])).convert("RGB").resize((64, 64)).save(buf, "PNG")
        truncated = buf.getvalue()[:-200]
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            resp = _post(http, truncated)
            assert resp.status_code == 400 and "truncated" in resp.json()["detail"], resp.text
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _slow_big_jpeg() -> bytes:
    """36 MP progressive JPEG of 230 KB, one scan repeated 54 times (64 scans are allowed):
    seconds of decoding."""
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((6000, 6000)).save(buf, "JPEG", progressive=True, quality=50)
    jpeg = buf.getvalue()
    start, end = _scans(jpeg)[-1]
    return jpeg[:end] + jpeg[start:end] * 54 + jpeg[end:]


def test_a_decode_that_overruns_frees_its_slot_at_once(tmp_path_factory):
    cfg = _config(tmp_path_factory, request_timeout=1.0, decode_workers=1)
    big = io.BytesIO()
    Image.effect_noise((1100, 1000), 64).convert("RGB").save(big, "PNG")
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        resp = http.post("/predict?task=A", content=_slow_big_jpeg(),
                         headers={"content-type": "image/jpeg"})
        assert resp.status_code == 503 and "decoded" in resp.json()["detail"], resp.text
        # The decode stopped with its request: this process (the embedded server) spends no
        # more CPU on it; a thread would decode on for another second, holding the only slot.
        cpu = time.process_time()
        time.sleep(0.6)
        assert time.process_time() - cpu < 0.25
        assert _post(http, big.getvalue()).status_code == 200


def test_a_client_that_hangs_up_stops_its_decode(tmp_path_factory):
    cfg = _config(tmp_path_factory, decode_workers=1)
    blob = _slow_big_jpeg()
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        with socket.create_connection(("127.0.0.1", httpx.URL(srv.url).port)) as sock:
            sock.sendall(b"POST /predict?task=A HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(blob), blob))
            time.sleep(0.8)  # received, its header checked, a child decoding it (for seconds)
        rs.wait_for("the child to be killed", lambda: srv.runtime.decoder._processes.killed == 1, 10)
        cpu = time.process_time()
        time.sleep(0.6)
        assert time.process_time() - cpu < 0.25  # nobody decodes for the client that left
        assert rs.predict(http, "A").status_code == 200
