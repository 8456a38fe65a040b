"""Big images decode in a child process (server/decode_process.py) to the same tensor as the
in-thread path, and a cancelled decode kills its child and frees the slot."""
from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image

from server.decode_process import PROCESS_PIXELS
from server.errors import ImageRejected
from server.images import ImageDecoder


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def decoder():
    d = ImageDecoder(size=32, max_bytes=20 << 20, max_pixels=40_000_000, workers=1)
    yield d
    d.close()


def test_a_big_image_decodes_in_a_child_to_the_in_thread_pixels(decoder):
    blob = _png(1100, 1000)
    assert 1100 * 1000 > PROCESS_PIXELS
    in_thread = decoder.decode(blob, "big.png")
    in_child = asyncio.run(decoder.decode_many([("big.png", blob)]))[0]
    assert torch.equal(in_thread, in_child)
    assert decoder._processes._idle  # the child stays for the next big image


def test_a_child_reports_a_corrupt_image_by_name(decoder):
    blob = _png(1100, 1000)
    with pytest.raises(ImageRejected) as e:
        asyncio.run(decoder.decode_many([("cut.png", blob[:len(blob) // 2])]))
    assert e.value.kind == "corrupt" and e.value.args[0].startswith("cut.png is a corrupt"), e.value


def _slow_jpeg() -> bytes:
    """36 MP progressive: a second or more of decoding."""
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((6000, 6000)).save(buf, "JPEG", progressive=True, quality=50)
    return buf.getvalue()


def test_a_cancelled_decode_kills_its_child(decoder):
    slow_jpeg = _slow_jpeg()

    async def cancel_then_decode():
        slow = asyncio.ensure_future(decoder.decode_many([("big.jpg", slow_jpeg)]))
        await asyncio.sleep(0.3)  # header checked, the child decoding
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return await decoder.decode_many([("next.png", _png(1100, 1000))])

    assert asyncio.run(cancel_then_decode()).shape == (1, 3, 32, 32)
    assert decoder._processes.killed == 1


def test_close_kills_the_idle_children(decoder):
    asyncio.run(decoder.decode_many([("big.png", _png(1100, 1000))]))
    procs = [child.proc for child in decoder._processes._idle]
    assert procs and all(p.poll() is None for p in procs)
    decoder.close()
    assert all(p.poll() is not None for p in procs)
