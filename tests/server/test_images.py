"""ImageDecoder: what is decoded, what is refused and with which kind (-> HTTP status)."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from residual_store.preprocess import eval_transform
from server.errors import ImageRejected
from server.images import ImageDecoder
from server.synthetic import image_bytes


@pytest.fixture
def decoder():
    d = ImageDecoder(size=32, max_bytes=200_000, max_pixels=1_000_000, workers=2)
    yield d
    d.close()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_supported_formats_match_the_trainers_transform(decoder, fmt):
    blob = image_bytes(3, fmt=fmt)
    expected = eval_transform(32)(Image.open(io.BytesIO(blob)).convert("RGB"))
    assert torch.equal(decoder.decode(blob), expected)


def test_rgba_and_grey_images_are_converted_like_the_trainer(decoder):
    for mode in ("RGBA", "L", "P"):
        buf = io.BytesIO()
        Image.open(io.BytesIO(image_bytes(1))).convert(mode).save(buf, "PNG")
        out = decoder.decode(buf.getvalue())
        assert out.shape == (3, 32, 32)


def test_animated_image_uses_the_first_frame(decoder):
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    expected = eval_transform(32)(frames[0])
    torch.testing.assert_close(decoder.decode(buf.getvalue()), expected)


@pytest.mark.parametrize("blob,kind", [
    (b"", "bad_request"),
    (b"hello, not an image", "not_image"),
    (image_bytes(0, fmt="GIF"), "not_image"),  # a real image, but not an accepted format
    (image_bytes(0, fmt="BMP"), "not_image"),
    (image_bytes(0, size=64, fmt="PNG")[:200], "corrupt"),  # truncated
    (b"x" * 200_001, "too_large"),
])
def test_refusals(decoder, blob, kind):
    with pytest.raises(ImageRejected) as info:
        decoder.decode(blob)
    assert info.value.kind == kind


def test_decompression_bomb_is_refused_from_the_header(decoder):
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, "PNG")  # 16 M pixels in a few KB
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(ImageRejected, match="pixels") as info:
        decoder.decode(buf.getvalue())
    assert info.value.kind == "too_large"


def test_a_16_bit_png_is_scaled_not_clipped_as_the_trainer_reads_it(decoder, tmp_path):
    """Issue 23: a 16-bit grey PNG became almost white; both sides share one decoder now."""
    import numpy as np

    from trainer.data import _load

    ramp16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp16).save(path)
    served = decoder.decode(path.read_bytes())
    assert torch.equal(served, eval_transform(32)(_load(path)))
    white = eval_transform(32)(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert served.mean() < white.mean() - 1.0  # mid-grey on average, not white


def test_exif_orientation_is_applied_like_the_trainer(decoder, tmp_path):
    from trainer.data import _load

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    assert torch.equal(decoder.decode(path.read_bytes()), eval_transform(32)(_load(path)))
