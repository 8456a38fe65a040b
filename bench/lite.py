"""Bench helpers that import neither torch nor numpy: load drivers (soak, serve_load) use them
in processes that only send requests, and the heavier benches share them (bench/common.py)."""
from __future__ import annotations

import argparse

from server.ports import free_port  # noqa: F401 - torch-free; the load drivers import it from here


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Unnormalised Zipf(s) weights of n items, 1 / (k+1)^s: item 0 is the most popular."""
    return [1.0 / (i + 1) ** s for i in range(n)]


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1,8,32" -> (1, 8, 32)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from e


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: "0.001,0.005" -> (0.001, 0.005)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from e


async def closed_loop(client, url: str, tasks: list[str], image: bytes, *, concurrency: int,
                      warmup: float, duration: float, seed: int, counters) -> dict:
    """`concurrency` clients, each posting `image` to `url`/predict for a task drawn with
    Zipf(1.0) popularity, back to back, for `warmup` + `duration` seconds. Only the last
    `duration` seconds count: latencies (s) of the 200s, errors (other answers and transport
    failures), the seconds measured, and how `await counters()` (a dict of counters, from
    /metrics) moved over them."""
    import asyncio
    import random
    import time

    import httpx

    weights = zipf_weights(len(tasks))
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = time.monotonic() + warmup + duration

    async def one_client():
        nonlocal errors
        while time.monotonic() < stop_at:
            task = rng.choices(tasks, weights)[0]
            t0 = time.perf_counter()
            try:
                resp = await client.post(f"{url}/predict?task={task}&top_k=1", content=image,
                                         headers={"content-type": "image/png"})
                ok = resp.status_code == 200
            except httpx.HTTPError:
                ok = False
            if measuring:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    clients = [asyncio.create_task(one_client()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    before, t0 = await counters(), time.monotonic()
    measuring = True
    await asyncio.gather(*clients)
    after, elapsed = await counters(), time.monotonic() - t0
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed,
            "metrics": {k: after[k] - before[k] for k in after}}
