"""What may be predicted: a path, encoded bytes, or a PIL image; each becomes a multipart part."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Any]  # Any: a PIL.Image.Image

_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"))


def content_type(data: bytes) -> str:
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"  # the server says what it is not (415)


def as_part(image: ImageInput, position: int) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) of one image; OSError for a path that cannot be read,
    TypeError for something that is no image at all."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()
        return path.name, data, content_type(data)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return f"image[{position}]", data, content_type(data)
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL, without importing it here
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # lossless: the server sees the pixels given
        return f"image[{position}]", buf.getvalue(), "image/png"
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes or a "
                    "PIL image")


def as_parts(images: ImageInput | list | tuple) -> list[tuple[str, bytes, str]]:
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("no image given")
    return [as_part(image, i) for i, image in enumerate(items)]
