"""deploy/kubernetes: the base and the gpu overlay, rendered, against the Kubernetes schemas.

kubectl/kustomize are not installed where the tests run: kustomize_lite renders the
kustomizations (the subset deploy/ uses) and kubernetes-validate checks each resource offline
against the strict (no unknown fields) OpenAPI schemas it ships.
"""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .kustomize_lite import load_documents, pod_spec, render
from .support import KUSTOMIZE

# The oldest Kubernetes minor the manifests promise to fit, and the newest the package knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
JOB_TEMPLATES = sorted((KUSTOMIZE / "jobs").glob("*.yaml"))


def rendered(name: str) -> list[dict]:
    return render(KUSTOMIZE / name)


def by_kind(resources: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def container(resource: dict, name: str) -> dict:
    return next(c for c in pod_spec(resource)["containers"] if c["name"] == name)


def env(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def resource_id(r: dict) -> str:
    return f"{r['kind']}/{r['metadata'].get('name') or r['metadata'].get('generateName')}"


CASES = [(f"{layer}:{resource_id(r)}", r)
         for layer in ("base", "overlays/gpu") for r in rendered(layer)]
CASES += [(f"jobs/{p.name}:{resource_id(r)}", r) for p in JOB_TEMPLATES for r in load_documents(p)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("resource", [r for _, r in CASES], ids=[i for i, _ in CASES])
def test_resource_matches_the_kubernetes_schema(resource, version):
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as e:  # a jsonschema error, short message only
        path = "/".join(str(p) for p in e.absolute_path)
        pytest.fail(f"{resource_id(resource)} (k8s {version}) at /{path}: {e.message}", pytrace=False)


def test_base_has_the_fleet():
    kinds = {(r["kind"], r["metadata"]["name"]) for r in rendered("base")}
    assert {("Deployment", "uda-serve"), ("Service", "uda-serve"), ("Ingress", "uda-serve"),
            ("PodDisruptionBudget", "uda-serve"), ("HorizontalPodAutoscaler", "uda-serve"),
            ("StatefulSet", "redis"), ("Service", "redis"), ("Secret", "uda-redis"),
            ("NetworkPolicy", "redis-clients")} <= kinds
    assert all(r["metadata"].get("namespace") == "uda" for r in rendered("base") if r["kind"] != "Namespace")


def test_serve_probes_and_drain():
    deploy = by_kind(rendered("base"), "Deployment", "uda-serve")
    c = container(deploy, "uda-serve")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env(c)["UDA_GRACE_PERIOD"])
    # The kubelet's grace period must cover the preStop pause plus the server's own drain.
    assert pod_spec(deploy)["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    assert "--grace-period=$(UDA_GRACE_PERIOD)" in c["args"]
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_serve_flags_come_from_env_it_defines():
    c = container(by_kind(rendered("base"), "Deployment", "uda-serve"), "uda-serve")
    assert c["args"][0] == "uda-serve"
    defined = env(c)
    for arg in c["args"][1:]:
        if "$(" in arg:
            var = arg.split("$(", 1)[1].split(")", 1)[0]
            assert var in defined, f"{arg} refers to undefined env {var}"
    assert defined["UDA_STORE"].startswith("redis://uda-serve@redis:6379/")
    assert defined["REDIS_PASSWORD"]["secretKeyRef"] == {"name": "uda-redis", "key": "serve-password"}


def test_selectors_match_the_pods():
    resources = rendered("base")
    labels = pod_spec_labels(by_kind(resources, "Deployment", "uda-serve"))
    for kind in ("Service", "PodDisruptionBudget"):
        spec = by_kind(resources, kind, "uda-serve")["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = by_kind(resources, "HorizontalPodAutoscaler", "uda-serve")["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) == ("Deployment", "uda-serve")
    redis_labels = pod_spec_labels(by_kind(resources, "StatefulSet", "redis"))
    assert by_kind(resources, "Service", "redis")["spec"]["selector"].items() <= redis_labels.items()


def pod_spec_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_ingress_routes_by_task_with_consistent_hashing():
    ingress = by_kind(rendered("base"), "Ingress", "uda-serve")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$arg_task"
    assert ingress["spec"]["ingressClassName"] == "nginx"


def test_only_server_and_trainer_reach_redis():
    resources = rendered("base")
    policy = by_kind(resources, "NetworkPolicy", "redis-clients")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_spec_labels(by_kind(resources, "StatefulSet", "redis")).items()
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    (expr,) = peer["podSelector"]["matchExpressions"]
    allowed = set(expr["values"]) if expr["operator"] == "In" else set()
    component = "app.kubernetes.io/component"
    assert expr["key"] == component
    assert pod_spec_labels(by_kind(resources, "Deployment", "uda-serve"))[component] in allowed
    for job in JOB_TEMPLATES:
        (doc,) = load_documents(job)
        assert doc["spec"]["template"]["metadata"]["labels"][component] in allowed, job.name
    assert pod_spec_labels(by_kind(resources, "StatefulSet", "redis"))[component] not in allowed


def test_gpu_overlay_adds_the_gpu_and_the_cuda_image():
    base = container(by_kind(rendered("base"), "Deployment", "uda-serve"), "uda-serve")
    gpu = container(by_kind(rendered("overlays/gpu"), "Deployment", "uda-serve"), "uda-serve")
    assert base["image"].endswith("-cpu") and gpu["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in base["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(base)["UDA_DEVICE"] == "cpu" and env(gpu)["UDA_DEVICE"] == "cuda"
    # The patch only changes what it names: probes and the Redis credentials survive.
    assert gpu["readinessProbe"] == base["readinessProbe"]
    assert env(gpu)["REDIS_PASSWORD"] == env(base)["REDIS_PASSWORD"]


def test_train_job_runs_torchrun_and_publishes_with_the_trainer_user():
    (job,) = load_documents(KUSTOMIZE / "jobs" / "train-job.yaml")
    c = container(job, "uda-train")
    assert c["command"][0] == "torchrun"
    assert "trainer.cli" in c["command"]
    values = env(c)
    assert "--nproc-per-node=$(NPROC)" in c["command"]
    assert int(values["NPROC"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert values["UDA_STORE"].startswith("redis://uda-train@")
    assert values["REDIS_PASSWORD"]["secretKeyRef"]["key"] == "train-password"
    assert "--publish=$(UDA_STORE)" in c["args"]


def test_pods_run_as_non_root():
    for layer in ("base", "overlays/gpu"):
        for r in rendered(layer):
            spec = pod_spec(r)
            if spec:
                assert spec["securityContext"]["runAsNonRoot"] is True, resource_id(r)
                for c in spec["containers"]:
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_validation_is_strict():
    """Guards the test itself: an unknown field must fail, not pass silently."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomize_lite_refuses_what_it_does_not_model(tmp_path: Path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [], "replicas": []}))
    with pytest.raises(ValueError, match="replicas"):
        render(tmp_path)
