"""docker/Dockerfile, read statically (no Docker engine where the tests run)."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from .support import DOCKER, ROOT, free_port, live_process

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


def image_env() -> dict[str, str]:
    """The runtime stage's ENV variables (the last value of each)."""
    pairs = [w.split("=", 1) for word, rest in stages()["runtime"] if word == "ENV"
             for w in shlex.split(rest)]
    return dict(pairs)


def resolve(text: str, **overrides: str) -> str:
    """`${ARG}` references replaced by the ARG defaults (or `overrides`), as a build would."""
    return re.sub(r"\$\{(\w+)\}", lambda m: overrides.get(m.group(1)) or arg_default(m.group(1)), text)


def torch_index(flavor: str, cuda_version: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(DOCKER / "torch-index.sh"), flavor, cuda_version],
                          capture_output=True, text=True)


def test_torch_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if d.startswith(("torch==", "torchvision==")))
    assert arg_default("TORCH_VERSION") == pins["torch"]
    assert arg_default("TORCHVISION_VERSION") == pins["torchvision"]


def test_cpu_by_default_cuda_by_build_argument():
    assert arg_default("FLAVOR") == "cpu"
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= set(stages())
    assert ("FROM", "base-${FLAVOR} AS base") in instructions()
    assert torch_index("cpu", "").stdout.strip() == "https://download.pytorch.org/whl/cpu"  # no CUDA libraries


@pytest.mark.parametrize("cuda_version", [None, "12.6.3"], ids=["default", "overridden"])
def test_cuda_base_and_torch_wheels_follow_one_build_argument(cuda_version):
    """With the default CUDA_VERSION or another one, the base image's CUDA release and the
    torch wheel index name the same CUDA major.minor."""
    cuda_version = cuda_version or arg_default("CUDA_VERSION")
    (base,) = [rest for word, rest in instructions() if word == "FROM" and rest.endswith(" AS base-cuda")]
    image = resolve(base.split(" AS ")[0], CUDA_VERSION=cuda_version)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", image)
    assert m, image
    builder = stages()["builder"]
    # The builder stage must declare both, or they are empty inside it.
    assert {("ARG", "FLAVOR"), ("ARG", "CUDA_VERSION")} <= set(builder)
    (install,) = [rest for word, rest in builder if word == "RUN" and "torch==" in rest]
    assert 'torch-index.sh "$FLAVOR" "$CUDA_VERSION"' in install and '--index-url "$index"' in install
    done = torch_index("cuda", cuda_version)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"https://download.pytorch.org/whl/cu{m.group(1)}{m.group(2)}"


@pytest.mark.parametrize("flavor,cuda_version,message", [
    ("cuda", "", "is not MAJOR.MINOR"), ("cuda", "12", "is not MAJOR.MINOR"),
    ("gpu", "12.8.1", "is not cpu or cuda")])
def test_torch_index_refuses_what_it_cannot_name(flavor, cuda_version, message):
    done = torch_index(flavor, cuda_version)
    assert done.returncode != 0 and message in done.stderr and not done.stdout


def test_multi_stage_runtime_is_slim_and_non_root():
    runtime = stages()["runtime"]
    # Only the virtual environment comes from the builder: no compilers, no source tree.
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert instructions()[-1][0] == "CMD"


def healthcheck_command() -> list[str]:
    (check,) = [rest for word, rest in stages()["runtime"] if word == "HEALTHCHECK"]
    return json.loads(check.split(" CMD ", 1)[1])


def test_healthcheck_probes_healthz():
    assert "/healthz" in " ".join(healthcheck_command())


def test_compose_leaves_the_port_to_the_image():
    """compose runs the image's server where the image's HEALTHCHECK looks for it."""
    serve = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["uda-serve"]
    assert not [w for w in serve["command"] if w.startswith(("--port", "--host"))]
    assert "UDA_PORT" not in serve.get("environment", {})
    # The replicas publish no port (`--scale`); the proxy dials them on the image's port.
    proxy = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["proxy"]
    assert proxy["environment"]["UDA_SERVE_ADDR"].rsplit(":", 1)[1] == image_env()["UDA_PORT"]
    assert image_env()["UDA_HOST"] == "0.0.0.0"  # reachable from the proxy's container


def test_named_volumes_mount_on_directories_the_image_user_owns():
    """Docker creates a fresh named volume from the image's directory at the mount point, and
    root-owned when the image has none there: the non-root user could not write it."""
    run = " ".join(rest for word, rest in stages()["runtime"] if word == "RUN")
    made = {d for cmd in re.findall(r"mkdir -p ([^&]+)", run) for d in cmd.split()}
    owned = {d for cmd in re.findall(r"chown -R uda:uda ([^&]+)", run) for d in cmd.split()}
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    named = set(compose["volumes"])
    checked = 0
    for name, service in compose["services"].items():
        if "build" not in service:  # only services that run this project's image
            continue
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source not in named:
                continue
            checked += 1
            assert target in made, f"{name}: volume {source} mounts on {target}, which the image never creates"
            assert any(target == d or target.startswith(d.rstrip("/") + "/") for d in owned), \
                f"{name}: {target} is not chowned to the image's user"
    assert checked >= 2  # model-cache (serve, train) and train-runs (train)


@pytest.mark.integration
def test_healthcheck_follows_the_port_the_server_listens_on(tmp_path):
    """The image's CMD and HEALTHCHECK, run as written with the image's environment and a
    non-default UDA_PORT: the check passes, and fails when pointed at another port."""
    port = free_port()
    assert str(port) != image_env()["UDA_PORT"]
    venv_bin = os.path.dirname(sys.executable)
    # Loopback instead of the image's 0.0.0.0: this is a shared machine, not a container.
    env = {**os.environ, **image_env(), "UDA_HOST": "127.0.0.1", "UDA_PORT": str(port),
           "HOME": os.environ.get("HOME", str(tmp_path)), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    serve = json.loads(instructions()[-1][1])
    serve[serve.index("--store") + 1] = str(tmp_path / "residuals")
    with live_process("uda-serve", serve, tmp_path / "uda-serve.log",
                      f"http://127.0.0.1:{port}/healthz", env=env):
        done = subprocess.run(healthcheck_command(), env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        elsewhere = {**env, "UDA_PORT": str(free_port())}
        done = subprocess.run(healthcheck_command(), env=elsewhere, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0


def test_default_command_is_uda_serve_and_no_entrypoint_blocks_uda_train():
    assert not [w for w, _ in instructions() if w == "ENTRYPOINT"]
    assert instructions()[-1][1].startswith('["uda-serve"')


@pytest.mark.parametrize("source", ["pyproject.toml", "README.md", "residual_store", "trainer", "server",
                                    "docker/torch-index.sh"])
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
