"""Hostile inputs of issue 24 for the soak: each one sent, timed, and its outcome named.

    long-thin   a 1 x 40,000,000 grey PNG of ~80 KB (413 from its header, --max-image-side)
    many-scans  a progressive JPEG repeating one scan 50,000 times (413: JPEG scans)
    big-json    a 100 MB /v2 JSON body, chunked, no length (413 while it streams)
    slowloris   20 connections trickling a request head (closed by the header timeout)
    one-byte    a chunked /predict body in 1-byte chunks (413/400: the chunk-size floor)
    big-decode  a 36 MP progressive JPEG of 230 KB repeating one scan 54 times: within every
                header limit, seconds of decoding (in a decode process); 200 is a right answer

`send(kind, url)` returns (outcome, seconds): an HTTP status, or "closed" when the server
dropped the connection, which is the right answer to a slowloris or to a body it stopped
reading. A 5xx or a connection still open after its bound is the failure.
"""
from __future__ import annotations

import functools
import io
import socket
import struct
import threading
import time
import zlib
from urllib.parse import urlsplit

KINDS = ("long-thin", "many-scans", "big-json", "slowloris", "one-byte", "big-decode")
ACCEPTED = {"big-decode"}  # kinds a 200 is a right answer to
SLOWLORIS_CONNECTIONS = 20
SLOWLORIS_BOUND_S = 30.0  # longer than any header timeout the server may use


@functools.lru_cache(maxsize=None)
def long_thin_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height = 40_000_000
    rows = zlib.compressobj(9)
    data = b"".join(rows.compress(b"\0\0" * 1_000_000) for _ in range(height // 1_000_000)) + rows.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@functools.lru_cache(maxsize=None)
def many_scans_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((1024, 1024)).save(buf, "JPEG", progressive=True)
    jpeg = buf.getvalue()
    # A scan (with any tables before the next one) runs from its SOS marker to the next SOS or
    # EOI; inside entropy-coded data a 0xFF byte is always followed by 0, so the split is exact.
    starts = [i for i in range(len(jpeg) - 1) if jpeg[i:i + 2] == b"\xff\xda"] + [len(jpeg) - 2]
    start, end = min(zip(starts, starts[1:]), key=lambda span: span[1] - span[0])
    return jpeg[:end] + jpeg[start:end] * 50_000 + jpeg[end:]  # under the soak's 1 MiB


@functools.lru_cache(maxsize=None)
def big_decode_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((6000, 6000)).convert("RGB").save(buf, "JPEG", progressive=True, quality=50)
    jpeg = buf.getvalue()
    starts = [i for i in range(len(jpeg) - 1) if jpeg[i:i + 2] == b"\xff\xda"] + [len(jpeg) - 2]
    start, end = starts[-2], starts[-1]  # the last scan: a refinement pass over every block
    return jpeg[:end] + jpeg[start:end] * 54 + jpeg[end:]


def send(kind: str, url: str, task: str) -> tuple[str, float]:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    t0 = time.perf_counter()
    outcome = {"long-thin": lambda: _post_image(host, port, task, long_thin_png(), "image/png"),
               "many-scans": lambda: _post_image(host, port, task, many_scans_jpeg(), "image/jpeg"),
               "big-decode": lambda: _post_image(host, port, task, big_decode_jpeg(), "image/jpeg"),
               "big-json": lambda: _big_json(host, port, task),
               "slowloris": lambda: _slowloris(host, port),
               "one-byte": lambda: _one_byte_chunks(host, port, task)}[kind]()
    return outcome, time.perf_counter() - t0


def _status(sock: socket.socket) -> str:
    try:
        head = sock.recv(64)
    except OSError:
        return "closed"
    if not head.startswith(b"HTTP/1.1 "):
        return "closed"
    return head[9:12].decode()


def _post_image(host: str, port: int, task: str, blob: bytes, ctype: str) -> str:
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(f"POST /predict?task={task} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(blob)}\r\nConnection: close\r\n\r\n".encode())
        try:
            sock.sendall(blob)
        except OSError:
            pass  # refused before the whole body went: the status is still there to read
        return _status(sock)


def _chunked(host: str, port: int, path: str, ctype: str, chunks, limit_s: float = 30.0) -> str:
    with socket.create_connection((host, port), timeout=limit_s) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
        deadline = time.monotonic() + limit_s
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if time.monotonic() > deadline:
                    break
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return _status(sock)


def _big_json(host: str, port: int, task: str) -> str:
    piece = b"[]," * (1 << 18)  # 768 KiB; 131 of them: 100 MB
    body = [b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":['] + [piece] * 131
    return _chunked(host, port, f"/v2/models/{task}/infer", "application/json", iter(body))


def _one_byte_chunks(host: str, port: int, task: str) -> str:
    return _chunked(host, port, f"/predict?task={task}", "image/png", (b"x" for _ in range(9_000_000)),
                    limit_s=20.0)


def _slowloris(host: str, port: int) -> str:
    """Open connections that send one header byte a second; 'closed' when the server closed
    them all within SLOWLORIS_BOUND_S, else 'held'."""
    closed = []
    lock = threading.Lock()

    def one():
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                deadline = time.monotonic() + SLOWLORIS_BOUND_S
                while time.monotonic() < deadline:
                    sock.sendall(b"X")
                    time.sleep(1.0)
        except OSError:
            with lock:
                closed.append(1)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(SLOWLORIS_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "closed" if len(closed) == SLOWLORIS_CONNECTIONS else "held"
