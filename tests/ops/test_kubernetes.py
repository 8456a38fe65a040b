"""deploy/kubernetes: the cpu and gpu overlays, rendered, against the Kubernetes schemas.

kubectl/kustomize are not installed where the tests run: kustomize_lite renders the
kustomizations (the subset deploy/ uses) and kubernetes-validate checks each resource offline
against the strict (no unknown fields) OpenAPI schemas it ships.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .kustomize_lite import load_documents, pod_spec, render, set_image
from .support import KUSTOMIZE, OVERLAYS, ROOT

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


CASES = [(f"{layer}:{resource_id(r)}", r) for layer in OVERLAYS for r in rendered(layer)]
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


def test_gpu_overlay_adds_the_gpu():
    cpu = container(by_kind(rendered("overlays/cpu"), "Deployment", "uda-serve"), "uda-serve")
    gpu = container(by_kind(rendered("overlays/gpu"), "Deployment", "uda-serve"), "uda-serve")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(cpu)["UDA_DEVICE"] == "cpu" and env(gpu)["UDA_DEVICE"] == "cuda"
    # The patch only changes what it names: probes and the Redis credentials survive.
    assert gpu["readinessProbe"] == cpu["readinessProbe"]
    assert env(gpu)["REDIS_PASSWORD"] == env(cpu)["REDIS_PASSWORD"]


# -- images: each flavour sets its own ------------------------------------------------------------

def serve_image(tree: Path, layer: str) -> str:
    return container(by_kind(render(tree / layer), "Deployment", "uda-serve"), "uda-serve")["image"]


def readme_deploy_commands() -> list[str]:
    """The shell lines of the README's Deploy section (code blocks only, comments dropped)."""
    section = ROOT.joinpath("README.md").read_text().split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, re.S | re.M)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_base_leaves_the_image_to_the_overlays():
    assert "images" not in yaml.safe_load((KUSTOMIZE / "base" / "kustomization.yaml").read_text())
    assert serve_image(KUSTOMIZE, "base") == "vlp-uda"
    assert serve_image(KUSTOMIZE, "overlays/cpu") == "vlp-uda:0.1.0-cpu"
    assert serve_image(KUSTOMIZE, "overlays/gpu") == "vlp-uda:0.1.0-cuda"


def test_readme_image_steps_give_each_overlay_its_own_build(tmp_path):
    """Run the README's docker and kustomize lines (on a copy of deploy/kubernetes): every
    overlay the README applies runs an image the README pushed, built for its flavour."""
    lines = readme_deploy_commands()
    flavour_of = {}  # pushed image -> FLAVOR it was built with
    for line in lines:
        if m := re.fullmatch(r"docker build -f docker/Dockerfile (?:--build-arg FLAVOR=(\w+) )?"
                             r"-t (\S+) \. && docker push (\S+)", line):
            assert m.group(2) == m.group(3), line
            flavour_of[m.group(3)] = m.group(1) or "cpu"
    assert sorted(flavour_of.values()) == ["cpu", "cuda"], "the README builds and pushes both images"
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    edits = [m.groups() for line in lines
             if (m := re.fullmatch(r"\(cd deploy/kubernetes/(\S+) && kustomize edit set image (\S+)\)", line))]
    assert sorted(layer for layer, _ in edits) == sorted(OVERLAYS)
    for layer, arg in edits:
        set_image(tree / layer, arg)
    applied = [m.group(1) for line in lines if (m := re.fullmatch(r"kubectl apply -k deploy/kubernetes/(\S+)", line))]
    assert sorted(applied) == sorted(OVERLAYS)
    for layer in applied:
        image = serve_image(tree, layer)
        assert image in flavour_of, f"{layer} runs {image}, which the README never pushed"
        assert flavour_of[image] == ("cuda" if layer.endswith("gpu") else "cpu"), (layer, image)
        assert image.endswith("-" + flavour_of[image])


def test_set_image_replaces_only_its_entry(tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    set_image(tree / "overlays" / "gpu", "vlp-uda=registry.example:5000/team/vlp-uda:0.2.0-cuda")
    assert serve_image(tree, "overlays/gpu") == "registry.example:5000/team/vlp-uda:0.2.0-cuda"
    assert serve_image(tree, "overlays/cpu") == "vlp-uda:0.1.0-cpu"
    with pytest.raises(ValueError, match="NEWNAME:NEWTAG"):
        set_image(tree / "overlays" / "gpu", "vlp-uda=registry.example:5000/vlp-uda")


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
    for layer in OVERLAYS:
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
    shutil.copy(KUSTOMIZE / "base" / "serve-deployment.yaml", tmp_path)
    digest = {"name": "vlp-uda", "digest": "sha256:" + "0" * 64}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": ["serve-deployment.yaml"], "images": [digest]}))
    with pytest.raises(ValueError, match="digest"):
        render(tmp_path)
