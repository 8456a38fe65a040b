"""A TCP port free right now, for the servers that tests, benchmarks and notebooks start."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out and released: another process may take it before the
    caller binds it, which the loopback tests and benches accept."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
