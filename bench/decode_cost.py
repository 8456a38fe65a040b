"""What decoding in a child process costs per image, against decoding in a thread.

    python -m bench.decode_cost [--repeats 20]

For a few image sizes: the median seconds of `ImageDecoder.decode_many` on one image through
the thread pool (what every image up to PROCESS_PIXELS takes) and through a warm decode
process (what bigger images take: the bytes over a pipe, S x S RGB back), the ratio, and the
one-off start of a fresh child (after one was killed). Input size S is the tiny model's (32)
and ViT-B-16's (224).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from collections.abc import Sequence

from PIL import Image

SIZES = ((224, 224, "JPEG"), (1100, 1000, "JPEG"), (1100, 1000, "PNG"), (3000, 3000, "JPEG"))


def _image(width: int, height: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((width // 4, height // 4), 40).resize((width, height)).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    from server.images import ImageDecoder

    print(f"{'S':>4} {'image':>16} {'bytes':>9} {'thread ms':>10} {'process ms':>11} {'ratio':>6}")
    for size in (32, 224):
        decoder = ImageDecoder(size, 20 << 20, 40_000_000, workers=1)
        procs = decoder._processes
        try:
            for width, height, fmt in SIZES:
                blob = _image(width, height, fmt)
                thread = _median(lambda: decoder.decode(blob), args.repeats)
                asyncio.run(procs.decode(blob))  # warm: the child started
                child = _median(lambda: decoder.transform(asyncio.run(procs.decode(blob))), args.repeats)
                print(f"{size:>4} {f'{width}x{height} {fmt}':>16} {len(blob):>9} {thread * 1e3:>10.1f} "
                      f"{child * 1e3:>11.1f} {child / thread:>6.2f}")
            cold = []
            for _ in range(5):
                for child in procs._idle:
                    child.kill()
                procs._idle.clear()
                t0 = time.perf_counter()
                asyncio.run(procs.decode(_image(224, 224, "JPEG")))
                cold.append(time.perf_counter() - t0)
            print(f"S={size}: a fresh decode process answers its first image in "
                  f"{statistics.median(cold) * 1e3:.0f} ms (median of 5)")
        finally:
            decoder.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
