"""Reading image uploads out of HTTP requests with bounded memory.

Multipart `file` fields and one raw `image/*` body here; the Open Inference Protocol v2 bodies
(JSON, or JSON then binary data) are parsed in server/oip.py on top of `read_body` and the
limits below. The body is read as a stream and
cut off at a limit derived from --max-image-bytes and --max-batch, before it is all in memory,
and it must arrive within --request-timeout (408 otherwise), so a client that uploads slowly or
stalls cannot hold a connection and its buffers forever.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.errors import ImageRejected

_MULTIPART_OVERHEAD = 64 << 10  # headers and boundaries per part, generously


def body_limit(max_files: int, max_image_bytes: int, base64_json: bool = False) -> int:
    per_file = max_image_bytes * 4 // 3 + 4 if base64_json else max_image_bytes
    return max_files * (per_file + _MULTIPART_OVERHEAD)


async def _stream(request: Request, limit: int, timeout: float | None = None,
                  what: str = "--max-image-bytes x --max-batch") -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageRejected("too_large", f"request body of {declared} bytes exceeds the {limit} "
                                         f"byte limit ({what})")
    total = 0
    async for chunk in _within(request.stream(), timeout):
        total += len(chunk)
        if total > limit:
            raise ImageRejected("too_large", f"request body exceeds the {limit} byte limit ({what})")
        yield chunk


async def _within(chunks: AsyncIterator[bytes], timeout: float | None) -> AsyncIterator[bytes]:
    """`chunks`, failing with ImageRejected("timeout") when they have not all arrived within
    `timeout` seconds of the first read (None: no limit)."""
    if timeout is None:
        async for chunk in chunks:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ImageRejected("timeout", f"the request body did not arrive within {timeout:g} s "
                                           "(--request-timeout)") from None
        yield chunk


async def read_body(request: Request, limit: int, timeout: float | None = None,
                    what: str = "--max-image-bytes x --max-batch") -> bytes:
    return b"".join([chunk async for chunk in _stream(request, limit, timeout, what)])


async def read_images(request: Request, max_files: int, max_image_bytes: int,
                      timeout: float | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image in a /predict request; the body must arrive within
    `timeout` seconds."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _multipart(request, max_files, max_image_bytes, timeout)
    if ctype.startswith("image/"):
        return [("body", await read_body(request, max_image_bytes, timeout))]
    raise ImageRejected("not_image", f"content type {ctype or 'none'!r}: send multipart/form-data "
                                     "with `file` fields, or one image as an image/* body")


async def _multipart(request: Request, max_files: int, max_image_bytes: int,
                     timeout: float | None = None) -> list[tuple[str, bytes]]:
    parser = MultiPartParser(request.headers, _stream(request, body_limit(max_files, max_image_bytes), timeout),
                             max_files=max_files, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        kind = "too_large" if "too many" in str(e).lower() else "bad_request"
        raise ImageRejected(kind, f"multipart body: {e.message} (at most {max_files} files)") from e
    try:
        files = []
        for i, (field, value) in enumerate(form.multi_items()):
            if field == "file" and isinstance(value, UploadFile):
                files.append((value.filename or f"file[{i}]", await value.read()))
    finally:
        await form.close()
    if not files:
        raise ImageRejected("bad_request", "multipart body has no `file` field with an image")
    return files


JSON_BODY_CAP = 32 << 20  # default /v2 body cap, unless one image in base64 needs more


def json_body_limit(max_files: int, max_image_bytes: int) -> int:
    """The default cap of a /v2 JSON body: --max-batch images of --max-image-bytes in base64,
    but at most JSON_BODY_CAP unless one such image alone needs more. A JSON body is parsed
    whole into Python objects, so its cap stays small; big batches of big images go multipart."""
    full = body_limit(max_files, max_image_bytes, base64_json=True)
    one = body_limit(1, max_image_bytes, base64_json=True)
    return max(one, min(full, JSON_BODY_CAP))


def json_items_limit(max_files: int) -> int:
    """Most commas and colons a v2 body may have: the images, their input's
    fields and a few parameters. `[],[],...` or `1,1,...` would cost ~50 bytes of Python
    objects per byte of JSON; this is counted before anything is parsed."""
    return 256 + 4 * max_files
