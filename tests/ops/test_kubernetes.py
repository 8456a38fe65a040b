"""deploy/kubernetes: the cpu and gpu overlays, rendered, against the Kubernetes schemas.

kubectl/kustomize are not installed where the tests run: kustomize_lite renders the
kustomizations (the subset deploy/ uses) and kubernetes-validate checks each resource offline
against the strict (no unknown fields) OpenAPI schemas it ships.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import kubernetes_validate
import pytest
import yaml

from .kustomize_lite import load_documents, pod_spec, render, set_image
from .netpol_lite import Pod, allowed, selects
from trainer.export import ARTIFACT

from .support import KUSTOMIZE, OVERLAYS, ROOT, k8s_expand

# The oldest Kubernetes minor the manifests promise to fit, and the newest the package knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
JOB_FILES = sorted((KUSTOMIZE / "jobs").glob("*.yaml"))
JOB_TEMPLATES = [p for p in JOB_FILES if load_documents(p)[0]["kind"] == "Job"]
# Claims deploy/ mounts but does not create: the datasets, which only the cluster's owner knows.
USER_CLAIMS = {"uda-datasets"}


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
CASES += [(f"jobs/{p.name}:{resource_id(r)}", r) for p in JOB_FILES for r in load_documents(p)]


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
            ("Service", "uda-serve-v2"), ("Ingress", "uda-serve-v2"),
            ("PodDisruptionBudget", "uda-serve"), ("HorizontalPodAutoscaler", "uda-serve"),
            ("StatefulSet", "redis"), ("Service", "redis"), ("Secret", "uda-redis"),
            ("NetworkPolicy", "redis-clients")} <= kinds
    assert all(r["metadata"].get("namespace") == "uda" for r in rendered("base") if r["kind"] != "Namespace")


def test_serve_probes_and_drain():
    deploy = by_kind(rendered("base"), "Deployment", "uda-serve")
    c = container(deploy, "uda-serve")
    # A Redis outage must not empty the Service (tests/integration/test_reliability_redis_faults.py
    # shows /readyz?store=optional staying ready through one).
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz?store=optional"
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
    hpa = by_kind(resources, "HorizontalPodAutoscaler", "uda-serve")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", "uda-serve")
    # The HPA owns the replica count: a `replicas` in the manifest would reset it at each apply.
    assert "replicas" not in by_kind(resources, "Deployment", "uda-serve")["spec"]
    assert hpa["minReplicas"] >= 2  # a drain or a node loss leaves one replica serving
    redis_labels = pod_spec_labels(by_kind(resources, "StatefulSet", "redis"))
    assert by_kind(resources, "Service", "redis")["spec"]["selector"].items() <= redis_labels.items()


def pod_spec_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


# -- routing: ingress-nginx's choice of Ingress and hash key, for the subset deploy/ uses ------------

HASH_BY = "nginx.ingress.kubernetes.io/upstream-hash-by"


def route(ingresses: list[dict], target: str) -> tuple[dict, dict]:
    """(Ingress, path entry) ingress-nginx picks for `target`: the longest matching Prefix path
    over every Ingress of the (single, host-less) server."""
    candidates = matching_paths(ingresses, target)
    assert candidates, f"no Ingress path serves {target}"
    _, ing, entry = max(candidates, key=lambda c: c[0])
    return ing, entry


def matching_paths(ingresses: list[dict], target: str) -> list[tuple[int, dict, dict]]:
    path = urlsplit(target).path
    candidates = []
    for ing in ingresses:
        (rule,) = ing["spec"]["rules"]
        assert "host" not in rule, "route() models host-less rules only"
        for entry in rule["http"]["paths"]:
            assert entry["pathType"] == "Prefix", "route() models Prefix paths only"
            prefix = entry["path"].rstrip("/")
            if path == prefix or path.startswith(prefix + "/"):
                candidates.append((len(prefix), ing, entry))
    return candidates


def nginx_value(expression: str, target: str) -> str:
    """An upstream-hash-by value for a request to `target` (nginx variables $arg_NAME, $uri)."""
    parts = urlsplit(target)
    args = dict(parse_qsl(parts.query))

    def variable(m: re.Match) -> str:
        name = m.group(1)
        if name == "uri":
            return parts.path
        if name.startswith("arg_"):
            return args.get(name[4:], "")
        raise AssertionError(f"nginx_value does not model ${name}")
    return re.sub(r"\$(\w+)", variable, expression)


def upstream_and_key(ingresses: list[dict], target: str) -> tuple[str, str]:
    """(Service the request goes to, its consistent-hash key)."""
    ing, entry = route(ingresses, target)
    return entry["backend"]["service"]["name"], nginx_value(ing["metadata"]["annotations"][HASH_BY], target)


def test_ingress_routes_by_task_with_consistent_hashing():
    ingresses = [r for r in rendered("base") if r["kind"] == "Ingress"]
    main = by_kind(ingresses, "Ingress", "uda-serve")
    assert main["metadata"]["annotations"][HASH_BY] == "$arg_task"
    assert all(ing["spec"]["ingressClassName"] == "nginx" for ing in ingresses)
    seen = {}
    for task in ("Ar2Cl", "Pr2Rw"):
        keys = {upstream_and_key(ingresses, t) for t in (f"/predict?task={task}",
                                                         f"/predict?top_k=3&task={task}")}
        (predict,) = keys  # the same replica whatever else the query says
        (infer,) = {upstream_and_key(ingresses, f"/v2/models/{task}/infer")}
        assert predict[1] and infer[1], f"{task}: an empty hash key sends every task to one replica"
        seen[task] = (predict, infer)
    assert seen["Ar2Cl"][0] != seen["Pr2Rw"][0] and seen["Ar2Cl"][1] != seen["Pr2Rw"][1]
    assert upstream_and_key(ingresses, "/predict?task=Ar2Cl")[0] == "uda-serve"
    assert upstream_and_key(ingresses, "/v2/models/Ar2Cl/infer")[0] == "uda-serve-v2"


def test_ingress_routes_the_public_api_only():
    ingresses = [r for r in rendered("base") if r["kind"] == "Ingress"]
    for public in ("/predict?task=A", "/v2/models/A/infer", "/v2/health/ready", "/tasks",
                   "/healthz", "/readyz?store=optional", "/openapi.json"):
        assert matching_paths(ingresses, public), public
    for private in ("/metrics", "/admin/reload", "/admin/tasks/A/load", "/admin/fingerprint"):
        assert not matching_paths(ingresses, private), f"{private} is reachable from outside"


def test_ingress_body_limit_lets_the_server_answer_a_too_large_image():
    """nginx's own 413 is an HTML page: up to one image of the server's limit, base64 JSON
    included, the body must reach the server, whose 413 is JSON."""
    from server.config import ServeConfig
    from server.uploads import body_limit

    needed = body_limit(1, ServeConfig().max_image_bytes, base64_json=True)
    for ing in (r for r in rendered("base") if r["kind"] == "Ingress"):
        size = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert size.endswith("m")
        assert int(size[:-1]) * 2**20 >= needed, ing["metadata"]["name"]


def test_each_hash_key_has_its_own_service():
    """ingress-nginx builds one upstream per Service and port, with the hash key of whichever
    Ingress names it first: two keys on one Service would silently become one."""
    resources = rendered("base")
    ingresses = [r for r in resources if r["kind"] == "Ingress"]
    keys_by_service: dict[tuple, set[str]] = {}
    for ing in ingresses:
        for entry in ing["spec"]["rules"][0]["http"]["paths"]:
            backend = entry["backend"]["service"]
            keys_by_service.setdefault((backend["name"], backend["port"]["name"]), set()).add(
                ing["metadata"]["annotations"][HASH_BY])
    assert all(len(keys) == 1 for keys in keys_by_service.values()), keys_by_service
    pods = pod_spec_labels(by_kind(resources, "Deployment", "uda-serve"))
    http = container(by_kind(resources, "Deployment", "uda-serve"), "uda-serve")["ports"][0]["name"]
    for name, port in keys_by_service:
        spec = by_kind(resources, "Service", name)["spec"]
        assert spec["selector"].items() <= pods.items(), name
        assert {p["name"]: p["targetPort"] for p in spec["ports"]}[port] == http, name
    # Only the hash key differs: body size, timeouts and retries are the same for both APIs.
    others = [{k: v for k, v in ing["metadata"]["annotations"].items() if k != HASH_BY} for ing in ingresses]
    assert all(o == others[0] for o in others), others


def test_ingress_retries_a_503_predict_on_the_next_replica():
    for ing in (r for r in rendered("base") if r["kind"] == "Ingress"):
        retry = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
        # nginx never retries a POST (all of /predict and /infer) without non_idempotent.
        assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry), ing["metadata"]["name"]


# -- NetworkPolicies, evaluated by netpol_lite on the rendered pods -------------------------------

def pod_of(resource: dict) -> Pod:
    spec = resource["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for c in spec["spec"]["containers"]
             for p in c.get("ports", []) if "name" in p}
    return Pod(resource["metadata"].get("namespace", "uda"), spec["metadata"]["labels"], ports)


def test_network_policies_admit_exactly_the_intended_clients():
    resources = rendered("overlays/cpu")
    policies = [r for r in resources if r["kind"] == "NetworkPolicy"]
    serve_deploy = by_kind(resources, "Deployment", "uda-serve")
    serve, redis = pod_of(serve_deploy), pod_of(by_kind(resources, "StatefulSet", "redis"))
    http = serve.ports["http"]
    scrape_port = int(serve_deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    redis_port = redis.ports["redis"]
    ingress_nginx = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    stranger = Pod("default", {"app": "other"})
    debug = Pod("uda", {"run": "debug"})  # a smoke-test or debugging pod in the namespace
    trainers = [pod_of(job(p.name)) for p in JOB_TEMPLATES]
    expected = [
        (ingress_nginx, serve, http, True), (prometheus, serve, scrape_port, True),
        (debug, serve, http, True), (stranger, serve, http, False),
        (ingress_nginx, serve, http + 1, False),
        (serve, redis, redis_port, True), *[(t, redis, redis_port, True) for t in trainers],
        (ingress_nginx, redis, redis_port, False), (prometheus, redis, redis_port, False),
        (debug, redis, redis_port, False), (stranger, redis, redis_port, False),
        (serve, redis, redis_port + 1, False),
    ]
    got = [(src, dst, port, allowed(policies, src, dst, port)) for src, dst, port, _ in expected]
    assert got == expected
    # Both policies select their pods (and only them): nothing else in the namespace is isolated.
    for policy in policies:
        selected = [n for n, pod in (("uda-serve", serve), ("redis", redis))
                    if selects(policy["spec"]["podSelector"], pod.labels)]
        assert selected == [policy["metadata"]["labels"]["app.kubernetes.io/name"]], policy["metadata"]["name"]


def test_netpol_lite_refuses_what_it_does_not_model():
    policy = {"metadata": {"namespace": "uda"}, "spec": {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}}
    with pytest.raises(ValueError, match="ipBlock"):
        allowed([policy], Pod("uda", {}), Pod("uda", {}), 80)


def test_gpu_overlay_adds_the_gpu():
    cpu = container(by_kind(rendered("overlays/cpu"), "Deployment", "uda-serve"), "uda-serve")
    gpu = container(by_kind(rendered("overlays/gpu"), "Deployment", "uda-serve"), "uda-serve")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(cpu)["UDA_DEVICE"] == "cpu" and env(gpu)["UDA_DEVICE"] == "cuda"
    assert env(cpu)["UDA_STREAMS"] == str(int(cpu["resources"]["requests"]["cpu"]))  # a stream per core
    assert env(gpu)["UDA_STREAMS"] == "1"  # uda-serve refuses more on CUDA
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


def job(name: str) -> dict:
    (doc,) = load_documents(KUSTOMIZE / "jobs" / name)
    return doc


def volume_at(resource: dict, c: dict, path: str) -> tuple[dict, dict, str]:
    """(volume, its mount, path inside the volume) of a file `path` in container `c`."""
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod_spec(resource)["volumes"] if v["name"] == mount["name"]]
    return volume, mount, path[len(mount["mountPath"]):].lstrip("/")


def test_publish_job_reads_what_the_train_job_wrote():
    """The residual travels on the train Job's PersistentVolumeClaim: a ConfigMap holds 1 MiB
    and a ViT-B-16 residual is 0.7-3.3 MiB."""
    train, publish = job("train-job.yaml"), job("publish-job.yaml")
    workdir = next(a for a in k8s_expand(container(train, "uda-train")) if a.startswith("--workdir="))
    written = f"{workdir.split('=', 1)[1]}/{ARTIFACT}"
    argv = k8s_expand(container(publish, "uda-store"))
    (read,) = [a for a in argv[2:] if not a.startswith("--")]
    train_volume, _, train_rel = volume_at(train, container(train, "uda-train"), written)
    publish_volume, publish_mount, publish_rel = volume_at(publish, container(publish, "uda-store"), read)
    claim = train_volume["persistentVolumeClaim"]["claimName"]
    assert publish_volume["persistentVolumeClaim"]["claimName"] == claim
    assert publish_rel == train_rel  # the same file on the same claim
    assert publish_mount["readOnly"] is True
    defined = {d["metadata"]["name"] for p in JOB_FILES for d in load_documents(p)
               if d["kind"] == "PersistentVolumeClaim"}
    assert claim in defined, f"{claim} is mounted but no file in jobs/ creates it"


def test_volumes_and_mounts_agree():
    """Every mount names a volume of its pod, every volume is mounted, a read-only claim is
    mounted read-only, and every claim is created in deploy/ (or is the user's datasets)."""
    pods = [(f"{layer}:{resource_id(r)}", r) for layer in OVERLAYS for r in rendered(layer)]
    pods += [(p.name, d) for p in JOB_TEMPLATES for d in load_documents(p)]
    claims = {d["metadata"]["name"] for p in JOB_FILES for d in load_documents(p)
              if d["kind"] == "PersistentVolumeClaim"} | USER_CLAIMS
    for where, r in pods:
        spec = pod_spec(r)
        if not spec:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in r["spec"].get("volumeClaimTemplates", [])}
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])]
        assert {m["name"] for m in mounts} <= set(volumes) | templates, where
        assert set(volumes) <= {m["name"] for m in mounts}, f"{where}: a volume nothing mounts"
        for m in mounts:
            pvc = volumes.get(m["name"], {}).get("persistentVolumeClaim")
            if pvc:
                assert pvc["claimName"] in claims, f"{where}: claim {pvc['claimName']} is never created"
                if pvc.get("readOnly"):
                    assert m.get("readOnly") is True, f"{where}: {m['name']} mounted writable"


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


def test_every_claim_a_job_mounts_is_shipped():
    """A Job mounting a PersistentVolumeClaim nothing creates stays Pending forever."""
    shipped = {r["metadata"]["name"] for p in JOB_FILES for r in load_documents(p)
               if r["kind"] == "PersistentVolumeClaim"}
    for path in JOB_TEMPLATES:
        (job,) = load_documents(path)
        claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims <= shipped, f"{path.name} mounts {sorted(claims - shipped)}, which no file in jobs/ creates"
