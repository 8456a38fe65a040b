"""Bench helpers that import neither torch nor numpy: load drivers (soak, serve_load) use them
in processes that only send requests, and the heavier benches share them (bench/common.py)."""
from __future__ import annotations

import argparse
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
