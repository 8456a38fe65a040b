"""docker/compose.yaml (and the GPU override) against the compose-spec JSON schema, offline.

The schema is the one check-jsonschema vendors (check_jsonschema/builtin_schemas/vendor/
compose-spec.json, from github.com/compose-spec/compose-spec, schema/compose-spec.json).
"""
from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest
import yaml

from .support import DEPLOY, DOCKER

COMPOSE = DOCKER / "compose.yaml"
GPU = DOCKER / "compose.gpu.yaml"


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    ref = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(ref.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.parametrize("path", [COMPOSE, GPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path, compose_schema):
    validator = jsonschema.validators.validator_for(compose_schema)(compose_schema)
    errors = sorted(validator.iter_errors(yaml.safe_load(path.read_text())), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_stack_has_its_services(compose):
    services = compose["services"]
    assert {"redis", "uda-serve", "proxy", "prometheus", "alertmanager", "grafana", "train"} <= set(services)
    assert services["train"]["profiles"] == ["train"]
    # Only the trainer profile is optional: `docker compose up` starts the whole serving stack.
    assert all("profiles" not in s for name, s in services.items() if name != "train")


def test_redis_has_a_password_and_an_append_only_file(compose):
    script = compose["services"]["redis"]["command"][2]
    assert "--appendonly yes" in script
    assert "user default on >$${REDIS_ADMIN_PASSWORD}" in script
    env = compose["services"]["redis"]["environment"]
    # `:?` makes compose refuse to start without the passwords instead of running open.
    assert all(":?" in env[k] for k in ("REDIS_ADMIN_PASSWORD", "REDIS_SERVE_PASSWORD",
                                        "REDIS_TRAIN_PASSWORD"))


def test_redis_start_script_is_the_kubernetes_one(compose):
    """One ACL definition: compose escapes `$` as `$$`, otherwise the scripts are identical."""
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "base" / "redis.yaml").read_text()))
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    k8s_command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    compose_command = compose["services"]["redis"]["command"]
    assert [c.replace("$$", "$") for c in compose_command] == k8s_command


def test_servers_and_trainer_use_their_own_redis_users(compose):
    services = compose["services"]
    serve = " ".join(services["uda-serve"]["command"])
    train = " ".join(services["train"]["command"])
    assert "--store=redis://uda-serve@redis:6379/0" in serve
    assert "--publish=redis://uda-train@redis:6379/0" in train
    assert services["uda-serve"]["environment"]["REDIS_PASSWORD"].startswith("${REDIS_SERVE_PASSWORD:?")
    assert services["train"]["environment"]["REDIS_PASSWORD"].startswith("${REDIS_TRAIN_PASSWORD:?")
    assert services["train"]["healthcheck"] == {"disable": True}  # the image's check is the server's


def test_published_ports_are_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_prometheus_and_grafana_are_wired_to_deploy(compose):
    services = compose["services"]
    prom_mounts = services["prometheus"]["volumes"]
    assert "../deploy/prometheus/rules:/etc/prometheus/rules:ro" in prom_mounts
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_mounts
    grafana = services["grafana"]
    assert "../deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-false}"
    for mount in prom_mounts + grafana["volumes"]:
        source = mount.split(":", 1)[0]
        if source.startswith("."):
            assert (DOCKER / source).resolve().exists(), f"compose mounts missing {source}"


def test_every_variable_is_documented_in_env_example(compose):
    text = COMPOSE.read_text() + GPU.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (DOCKER / "env.example").read_text(), re.M))
    assert used <= documented, f"not in docker/env.example: {sorted(used - documented)}"


def test_replicas_scale_behind_the_shipped_haproxy(compose):
    """`up --scale uda-serve=N`: no replica publishes a host port (N would collide), the proxy
    runs deploy/haproxy/haproxy.cfg and resolves the service name on the port uda-serve uses."""
    services = compose["services"]
    assert "ports" not in services["uda-serve"] and "container_name" not in services["uda-serve"]
    proxy = services["proxy"]
    assert proxy["image"].startswith("haproxy:2.6")
    assert "../deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
    assert proxy["environment"]["UDA_SERVE_ADDR"] == "uda-serve:8000"  # the image's UDA_PORT
    assert re.search(r"^\s*UDA_PORT=8000\b", (DOCKER / "Dockerfile").read_text(), re.M)
    (port,) = proxy["ports"]
    assert port.endswith(":8080") and re.search(r"^\s*bind :8080$", (DEPLOY / "haproxy" / "haproxy.cfg").read_text(), re.M)


def test_alerts_reach_the_alertmanager(compose):
    services = compose["services"]
    am = services["alertmanager"]
    assert "../deploy/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in am["volumes"]
    assert "alertmanager" in services["prometheus"]["depends_on"]
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    assert all(r["receiver"] in receivers for r in config["route"].get("routes", []))
