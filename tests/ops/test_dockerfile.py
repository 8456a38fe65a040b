"""docker/Dockerfile, read statically (no Docker engine where the tests run)."""
from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest

from .support import DOCKER, ROOT

DOCKERFILE = DOCKER / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result, name = {}, None
    for word, rest in instructions():
        if word == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            result[name] = []
        elif name:
            result[name].append((word, rest))
    return result


def arg_default(name: str) -> str:
    for word, rest in instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}=default in the Dockerfile")


def test_torch_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if d.startswith(("torch==", "torchvision==")))
    assert arg_default("TORCH_VERSION") == pins["torch"]
    assert arg_default("TORCHVISION_VERSION") == pins["torchvision"]


def test_cpu_by_default_cuda_by_build_argument():
    assert arg_default("FLAVOR") == "cpu"
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= set(stages())
    assert ("FROM", "base-${FLAVOR} AS base") in instructions()
    assert arg_default("CUDA_IMAGE").startswith("nvidia/cuda:") and "runtime" in arg_default("CUDA_IMAGE")
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text  # CPU image: no CUDA libraries


def test_multi_stage_runtime_is_slim_and_non_root():
    runtime = stages()["runtime"]
    # Only the virtual environment comes from the builder: no compilers, no source tree.
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert instructions()[-1][0] == "CMD"


def test_healthcheck_probes_healthz():
    (check,) = [rest for word, rest in stages()["runtime"] if word == "HEALTHCHECK"]
    assert "/healthz" in check


def test_default_command_is_uda_serve_and_no_entrypoint_blocks_uda_train():
    assert not [w for w, _ in instructions() if w == "ENTRYPOINT"]
    assert instructions()[-1][1].startswith('["uda-serve"')


@pytest.mark.parametrize("source", ["pyproject.toml", "README.md", "residual_store", "trainer", "server"])
def test_copied_sources_exist_and_pass_dockerignore(source):
    assert (ROOT / source).exists()
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    included = True
    for rule in rules:  # last matching rule wins, as in Docker
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "**" or fnmatch.fnmatch(source, pattern):
            included = negate
    assert included, f".dockerignore keeps {source} out of the build context"


def test_builder_copies_every_package_setuptools_installs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {m.group(1) for m in re.finditer(r"^COPY (\w+) \./\1$", DOCKERFILE.read_text(), re.M)}
    assert packages == copied
