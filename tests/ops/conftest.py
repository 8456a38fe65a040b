"""Fixtures for tests/ops: the Prometheus tools, redis-server and haproxy, installed when missing."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from .support import ROOT, missing_tool


def ensured(script_name: str, *tools: str) -> dict[str, str]:
    """Paths of `tools`, after scripts/`script_name` installed them if one was missing (what
    `make test` runs first; this covers a bare `pytest`)."""
    if not all(shutil.which(t) for t in tools):
        script = ROOT / "scripts" / script_name
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
        if done.returncode != 0 or not all(shutil.which(t) for t in tools):
            reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            missing_tool(f"{'/'.join(tools)} missing and {script.name} failed: {reason}")
    return {t: shutil.which(t) for t in tools}


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of `prometheus` and `promtool`."""
    return ensured("ensure-prometheus.sh", "prometheus", "promtool")


@pytest.fixture(scope="session")
def redis_server_bin() -> str:
    """redis-server, for tests that start their own."""
    return ensured("ensure-redis.sh", "redis-server")["redis-server"]


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    """haproxy, for the loopback test of deploy/haproxy/haproxy.cfg."""
    return ensured("ensure-haproxy.sh", "haproxy")["haproxy"]
