"""Every YAML and JSON file of the operations tree parses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .support import DEPLOY, DOCKER, ROOT

OPS_TREES = (DOCKER, DEPLOY, ROOT / "tests" / "ops")
FILES = sorted(p for tree in OPS_TREES for p in tree.rglob("*")
               if p.suffix in {".yaml", ".yml", ".json"} and p.is_file())


def test_the_operations_tree_has_its_files():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    for expected in ("docker/compose.yaml", "docker/prometheus.yml",
                     "deploy/kubernetes/base/kustomization.yaml",
                     "deploy/kubernetes/overlays/cpu/kustomization.yaml",
                     "deploy/kubernetes/overlays/gpu/kustomization.yaml",
                     "deploy/prometheus/rules/uda-alerts.yaml", "deploy/grafana/dashboard.json"):
        assert expected in names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_file_parses(path: Path):
    text = path.read_text()
    if path.suffix == ".json":
        assert json.loads(text) is not None
    else:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs, f"{path} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document is a mapping"
