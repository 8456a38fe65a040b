"""The command lines in docker/ and deploy/ are accepted by the CLIs they run.

Each command is expanded the way its runtime would ($(VAR) from the container env in
Kubernetes, ${VAR:-default} from docker/env.example in compose) and parsed by the real
argparse parser; uda-serve's are also turned into a validated ServeConfig.
"""
from __future__ import annotations

import json
import re

import pytest
import yaml

from server import cli as serve_cli
from trainer import cli as train_cli

from .support import DOCKER, KUSTOMIZE, OVERLAYS, k8s_expand, kustomize_build, load_documents, pod_spec


def env_example() -> dict[str, str]:
    pairs = re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", (DOCKER / "env.example").read_text(), re.M)
    return {k: v or "example-secret" for k, v in pairs}


def compose_expand(word: str) -> str:
    values = env_example()

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in values:
            return values[name]
        assert op == ":-", f"{name} has no default and is not in env.example"
        return arg
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, word)


def check_serve(argv: list[str]) -> None:
    assert argv[0] == "uda-serve"
    args = serve_cli.build_parser().parse_args(argv[1:])
    serve_cli.config_from_args(args)  # raises ConfigError listing every bad flag


def check_train(argv: list[str]) -> None:
    if argv[0] == "torchrun":
        argv = ["uda-train", *argv[argv.index("trainer.cli") + 1:]]
    assert argv[0] == "uda-train"
    args = train_cli.build_parser().parse_args(argv[1:])
    assert args.publish and args.task


def serve_containers():
    for layer in OVERLAYS:
        deploy = next(r for r in kustomize_build(KUSTOMIZE / layer)
                      if (r["kind"], r["metadata"]["name"]) == ("Deployment", "uda-serve"))
        yield layer, pod_spec(deploy)["containers"][0]


@pytest.mark.parametrize("layer,container", list(serve_containers()), ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_serve_flags(layer, container):
    check_serve(k8s_expand(container))


def test_kubernetes_train_job_flags():
    (job,) = load_documents(KUSTOMIZE / "jobs" / "train-job.yaml")
    check_train(k8s_expand(pod_spec(job)["containers"][0]))


def test_compose_commands():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    check_serve([compose_expand(w) for w in services["uda-serve"]["command"]])
    check_train([compose_expand(w) for w in services["train"]["command"]])


def test_dockerfile_default_command():
    cmd = [line for line in (DOCKER / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    check_serve(json.loads(cmd[-1][len("CMD "):]))


def test_publish_job_uses_uda_store_import():
    from residual_store import cli as store_cli

    (job,) = load_documents(KUSTOMIZE / "jobs" / "publish-job.yaml")
    argv = k8s_expand(pod_spec(job)["containers"][0])
    assert argv[0] == "uda-store"
    args = store_cli.build_parser().parse_args(argv[1:])
    assert args.command == "import" and args.task == "Ar2Cl"


def test_serve_and_train_default_to_the_same_base():
    """A task trained with uda-train's defaults is served by uda-serve's defaults."""
    serve = serve_cli.config_from_args(serve_cli.build_parser().parse_args([]))
    train = train_cli.build_parser().parse_args([])
    assert (serve.model, serve.pretrained) == (train.model, train.pretrained)
