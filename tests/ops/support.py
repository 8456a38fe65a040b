"""Paths and small helpers shared by the tests/ops modules."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from server.ports import free_port  # noqa: F401 - the ops tests import it from here

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
KUSTOMIZE = DEPLOY / "kubernetes"
# What users apply (kubectl apply -k): one overlay per image flavour over the shared base.
OVERLAYS = ("overlays/cpu", "overlays/gpu")
# Kustomize components a user adds to an overlay (`components:`), built over each overlay.
COMPONENTS = ("components/monitoring", "components/ingress-tls")
RULES = DEPLOY / "prometheus" / "rules" / "uda-alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"

T = TypeVar("T")


def dashboard_targets() -> list[tuple[str, dict]]:
    """('panel title / refId', target) for every query target of the dashboard's panels."""
    dash = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} / {t['refId']}", t) for p in dash["panels"] if p["type"] != "row"
            for t in p["targets"]]


def rule_expressions() -> list[tuple[str, str]]:
    """(alert or record name, PromQL) for every rule of deploy/prometheus/rules."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize directory` prints (kubectl ships kustomize; the real one, not a
    model of it)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        missing_tool("kubectl is not installed: it builds the kustomizations of deploy/kubernetes")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{done.stderr}", pytrace=False)
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a Deployment/StatefulSet/Job/..., or None."""
    spec = resource.get("spec", {})
    if resource["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("spec")


def set_image(directory: Path, arg: str) -> None:
    """`kustomize edit set image NAME=NEWNAME:NEWTAG` run in `directory` (the README's one
    edit; kubectl has no `edit`): the entry for NAME is replaced or added, entries sorted by
    name, as kustomize writes them. The result is then built by the real kustomize."""
    name, sep, new = arg.partition("=")
    new_name, colon, new_tag = new.rpartition(":")
    if not (sep and colon and name and new_name and new_tag) or "/" in new_tag or "@" in new:
        raise ValueError(f"only `set image NAME=NEWNAME:NEWTAG` is modelled, not {arg!r}")
    path = directory / "kustomization.yaml"
    kust = yaml.safe_load(path.read_text())
    images = {i["name"]: i for i in kust.get("images", [])}
    images[name] = {"name": name, "newName": new_name, "newTag": new_tag}
    kust["images"] = [images[n] for n in sorted(images)]
    path.write_text(yaml.safe_dump(kust, sort_keys=False))


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


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there a minute later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def live_process(what: str, argv: list[str], log: Path, ready_url: str,
                 env: dict[str, str] | None = None, timeout: float = 240) -> Iterator[subprocess.Popen]:
    """`argv` running with its output in `log`, yielded once GET `ready_url` answers 200, and
    stopped on the way out; fails with the log's tail if it exits first."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
        return True if httpx.get(ready_url, timeout=5).status_code == 200 else None

    try:
        wait_for(f"{what} {ready_url}", ready, timeout=timeout)
        yield proc
    finally:
        stop(proc)
