"""Paths and small helpers shared by the tests/ops modules."""
from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
KUSTOMIZE = DEPLOY / "kubernetes"
# What users apply (kubectl apply -k): one overlay per image flavour over the shared base.
OVERLAYS = ("overlays/cpu", "overlays/gpu")
RULES = DEPLOY / "prometheus" / "rules" / "uda-alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"

T = TypeVar("T")


def k8s_expand(container: dict) -> list[str]:
    """A container's command + args with $(VAR) expanded from its env, as the kubelet does."""
    env = {e["name"]: e.get("value", "from-a-secret") for e in container.get("env", [])}
    words = container.get("command", []) + container.get("args", [])
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], w) for w in words]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing_tool(message: str) -> None:
    """Outside CI a missing tool skips; under CI=true it fails (nothing may be skipped there)."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0,
              interval: float = 0.25) -> T:
    """Poll `probe` until it returns something other than None; fail naming `what` if never.

    The timeout only bounds a hang on a slow machine; no test asserts on how long things take.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as e:  # the thing polled is not up yet: keep the last reason
            last_error = e
            value = None
        if value is not None:
            return value
        time.sleep(interval)
    pytest.fail(f"gave up waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))
