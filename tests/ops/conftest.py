"""Fixtures for tests/ops: the Prometheus tools and redis-server, installed when missing."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from .support import ROOT, missing_tool


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of `prometheus` and `promtool`, installed by scripts/ensure-prometheus.sh if missing."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        script = ROOT / "scripts" / "ensure-prometheus.sh"
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
        if done.returncode != 0 or not shutil.which("promtool"):
            reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            missing_tool(f"prometheus/promtool missing and {script.name} failed: {reason}")
    return {"prometheus": shutil.which("prometheus"), "promtool": shutil.which("promtool")}


@pytest.fixture(scope="session")
def redis_server_bin() -> str:
    """redis-server, for tests that start their own (scripts/start-redis.sh installs it)."""
    path = shutil.which("redis-server")
    if not path:
        script = ROOT / "scripts" / "start-redis.sh"
        missing_tool(f"redis-server is not installed: run {script} (it installs Debian's package)")
    return path
