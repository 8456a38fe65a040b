"""deploy/kubernetes: the cpu and gpu overlays and the components, built by the real
`kubectl kustomize`, against the Kubernetes schemas (kubernetes-validate checks each resource
offline against the strict, no-unknown-fields OpenAPI schemas it ships).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from trainer.export import ARTIFACT

from .netpol_lite import Pod, allowed, selects
from .support import (COMPONENTS, DASHBOARD, DEPLOY, KUSTOMIZE, OVERLAYS, ROOT, RULES, k8s_expand,
                      kustomize_build, load_documents, pod_spec, set_image)

# The oldest Kubernetes minor the manifests promise to fit, and the newest the package knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
JOB_FILES = sorted((KUSTOMIZE / "jobs").glob("*.yaml"))
JOB_TEMPLATES = [p for p in JOB_FILES if load_documents(p)[0]["kind"] == "Job"]
# Claims deploy/ mounts but does not create: the datasets, which only the cluster's owner knows.
USER_CLAIMS = {"uda-datasets"}


@functools.lru_cache(maxsize=None)
def _built(directory: str) -> str:
    return json.dumps(kustomize_build(Path(directory)))


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize directory` (a fresh copy each call: tests may edit what they get)."""
    return json.loads(_built(str(directory)))


def rendered(name: str) -> list[dict]:
    return render(KUSTOMIZE / name)


def with_components(overlay: str, components: tuple[str, ...], tmp: Path) -> list[dict]:
    """An overlay with components added, as a user's kustomization would (kustomize takes
    relative paths only)."""
    rel = lambda name: os.path.relpath(KUSTOMIZE / name, tmp)  # noqa: E731
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": [rel(overlay)], "components": [rel(c) for c in components]}))
    return kustomize_build(tmp)


@functools.lru_cache(maxsize=None)
def _component_builds() -> str:
    import tempfile
    out = {}
    for overlay in OVERLAYS:
        for component in COMPONENTS:
            with tempfile.TemporaryDirectory() as tmp:
                out[f"{overlay}+{component}"] = with_components(overlay, (component,), Path(tmp))
    return json.dumps(out)


def component_builds() -> dict[str, list[dict]]:
    return json.loads(_component_builds())


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


# Custom resources of the Prometheus Operator: no schema in kubernetes-validate.
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
CASES = [(f"{layer}:{resource_id(r)}", r) for layer in OVERLAYS for r in rendered(layer)]
CASES += [(f"{build}:{resource_id(r)}", r) for build, resources in component_builds().items()
          for r in resources if r["kind"] not in OPERATOR_KINDS]
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
    assert {("Deployment", "uda-serve"), ("Service", "uda-serve"), ("Deployment", "uda-proxy"),
            ("Service", "uda-proxy"), ("Ingress", "uda-proxy"),
            ("PodDisruptionBudget", "uda-serve"), ("HorizontalPodAutoscaler", "uda-serve"),
            ("StatefulSet", "redis"), ("Service", "redis"),
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


# -- routing: the Ingress to HAProxy, HAProxy to the replicas ------------------------------------

def route(ingresses: list[dict], target: str) -> tuple[dict, dict] | None:
    """(Ingress, path entry) serving `target`: an Exact path equal to it, else the longest
    matching Prefix path (the Ingress spec's rule), over every rule of every Ingress."""
    path = urlsplit(target).path
    best = None
    for ing in ingresses:
        for rule in ing["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                prefix = entry["path"].rstrip("/")
                if entry["pathType"] == "Exact":
                    hit, rank = path == entry["path"], 10**6
                else:
                    assert entry["pathType"] == "Prefix", "route() models Exact and Prefix paths"
                    hit, rank = path == prefix or path.startswith(prefix + "/"), len(prefix)
                if hit and (best is None or rank > best[0]):
                    best = (rank, ing, entry)
    return best[1:] if best else None


PUBLIC = ("/predict?task=A", "/v2/models/A/infer", "/v2/models/A/versions/2/infer", "/v2/models/A",
          "/v2/health/ready")
PRIVATE = ("/healthz", "/readyz?store=optional", "/tasks", "/metrics", "/admin/reload",
           "/admin/tasks/A/load", "/admin/fingerprint", "/openapi.json", "/predict/x")


@pytest.mark.parametrize("build", ["base", "overlays/cpu+components/ingress-tls"])
def test_the_public_route_is_the_inference_api_only(build):
    resources = rendered(build) if "+" not in build else component_builds()[build]
    ingresses = [r for r in resources if r["kind"] == "Ingress"]
    assert ingresses
    for public in PUBLIC:
        ing, entry = route(ingresses, public) or pytest.fail(f"no Ingress path serves {public}")
        assert entry["backend"]["service"]["name"] == "uda-proxy", public
    for private in PRIVATE:
        assert route(ingresses, private) is None, f"{private} is reachable from outside"
    # No controller-specific hashing left: the proxy does the routing, whatever the controller.
    for ing in ingresses:
        assert not any(k.startswith("nginx.ingress.kubernetes.io/")
                       for k in ing["metadata"].get("annotations", {})), ing["metadata"]["name"]


def test_tls_component_serves_its_host_with_a_certificate():
    (ing,) = [r for r in component_builds()["overlays/cpu+components/ingress-tls"] if r["kind"] == "Ingress"]
    (tls,) = ing["spec"]["tls"]
    hosts = {rule.get("host") for rule in ing["spec"]["rules"]}
    assert hosts == set(tls["hosts"]) and None not in hosts  # no host-less rule left over plain HTTP
    assert tls["secretName"]
    base_paths = [r["spec"]["rules"][0]["http"]["paths"] for r in rendered("base") if r["kind"] == "Ingress"]
    assert [rule["http"]["paths"] for rule in ing["spec"]["rules"]] == base_paths


def test_the_proxy_runs_the_shipped_haproxy_config_against_the_headless_service():
    resources = rendered("overlays/cpu")
    proxy = by_kind(resources, "Deployment", "uda-proxy")
    (c,) = pod_spec(proxy)["containers"]
    assert c["image"].startswith("haproxy:2.6")  # the branch tests/ops runs (Debian's 2.6)
    (volume,) = pod_spec(proxy)["volumes"]
    (mount,) = c["volumeMounts"]
    # The official image runs `haproxy -f /usr/local/etc/haproxy/haproxy.cfg`.
    assert mount["mountPath"] == "/usr/local/etc/haproxy" and "command" not in c and "args" not in c
    config_map = by_kind(resources, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"]["haproxy.cfg"] == (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    # Replicas by DNS: a headless Service over the serve pods, named in full (no search domains).
    host, port = env(c)["UDA_SERVE_ADDR"].rsplit(":", 1)
    service_name, namespace, svc, _ = host.split(".", 3)
    assert (namespace, svc) == (proxy["metadata"]["namespace"], "svc")
    service = by_kind(resources, "Service", service_name)
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses")  # draining pods leave the DNS
    serve = by_kind(resources, "Deployment", "uda-serve")
    assert service["spec"]["selector"].items() <= pod_spec_labels(serve).items()
    (serve_port,) = container(serve, "uda-serve")["ports"]
    assert int(port) == serve_port["containerPort"]
    # What the Ingress and clients reach is the proxy, on its http port.
    public = by_kind(resources, "Service", "uda-proxy")["spec"]
    assert public["selector"].items() <= pod_spec_labels(proxy).items()
    (p,) = public["ports"]
    assert p["targetPort"] in {q["name"] for q in c["ports"]}
    assert {q["name"]: q["containerPort"] for q in c["ports"]}[p["targetPort"]] == 8080
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], {q["name"]: q["containerPort"] for q in c["ports"]}[probe["port"]]) == ("/healthz", 8404)


def test_an_apply_never_overwrites_the_users_redis_secret():
    """The Secret is the user's (or external-secrets'): no build contains it, yet every pod
    that needs it names it, and the example file says how to create it."""
    builds = {layer: rendered(layer) for layer in OVERLAYS} | component_builds()
    for name, resources in builds.items():
        assert not [r for r in resources if r["kind"] == "Secret"], name
    refs = {ref["name"] for r in rendered("overlays/cpu") if pod_spec(r)
            for c in pod_spec(r)["containers"] for e in c.get("env", [])
            if (ref := e.get("valueFrom", {}).get("secretKeyRef")) and not ref.get("optional")}
    assert refs == {"uda-redis"}
    example = (KUSTOMIZE / "base" / "redis-secret.example.yaml").read_text()
    assert "kubectl -n uda create secret generic uda-redis" in example
    assert "create secret generic uda-redis" in ROOT.joinpath("README.md").read_text()


def test_monitoring_component_follows_kube_prometheus_stack():
    resources = component_builds()["overlays/cpu+components/monitoring"]
    serve = by_kind(resources, "Deployment", "uda-serve")
    monitors = {r["metadata"]["name"]: r for r in resources if r["kind"] == "PodMonitor"}
    assert set(monitors) == {"uda-serve", "uda-proxy"}
    proxy = by_kind(resources, "Deployment", "uda-proxy")
    (proxy_endpoint,) = monitors["uda-proxy"]["spec"]["podMetricsEndpoints"]
    assert monitors["uda-proxy"]["spec"]["selector"]["matchLabels"].items() <= pod_spec_labels(proxy).items()
    # The exporter's port, which the Ingress never routes (uda-proxy's Service has only http).
    assert {p["name"]: p["containerPort"] for p in container(proxy, "haproxy")["ports"]}[proxy_endpoint["port"]] == 8404
    monitor = monitors["uda-serve"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_spec_labels(serve).items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(serve, "uda-serve")["ports"]}
    assert endpoint["path"] == "/metrics"
    # The job every rule selects on (up{job="uda-serve"}).
    assert {"targetLabel": "job", "replacement": "uda-serve"} in endpoint["relabelings"]
    (rule,) = [r for r in resources if r["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    for r in (*monitors.values(), rule):
        assert r["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert r["metadata"]["namespace"] == "uda"
    (dashboard,) = [r for r in resources if r["kind"] == "ConfigMap"
                    and r["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    (content,) = dashboard["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())


def test_the_prometheus_rule_is_generated_from_the_rules_file():
    import importlib.util
    spec = importlib.util.spec_from_file_location("render_prometheusrule",
                                                  ROOT / "scripts" / "render-prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (KUSTOMIZE / "components" / "monitoring" / "prometheusrule.yaml").read_text()
    assert shipped == module.render(), "rerun scripts/render-prometheusrule.py"


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
    proxy = pod_of(by_kind(resources, "Deployment", "uda-proxy"))
    ingress_nginx = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    stranger = Pod("default", {"app": "other"})
    debug = Pod("uda", {"run": "debug"})  # a smoke-test or debugging pod in the namespace
    trainers = [pod_of(job(p.name)) for p in JOB_TEMPLATES]
    expected = [
        (proxy, serve, http, True), (prometheus, serve, scrape_port, True),
        (debug, serve, http, True), (stranger, serve, http, False),
        (proxy, serve, http + 1, False),
        # The Ingress controller reaches the proxy, never a replica directly.
        (ingress_nginx, serve, http, False),
        (serve, redis, redis_port, True), *[(t, redis, redis_port, True) for t in trainers],
        (ingress_nginx, redis, redis_port, False), (proxy, redis, redis_port, False),
        (prometheus, redis, redis_port, False),
        (debug, redis, redis_port, False), (stranger, redis, redis_port, False),
        (serve, redis, redis_port + 1, False),
    ]
    got = [(src, dst, port, allowed(policies, src, dst, port)) for src, dst, port, _ in expected]
    assert got == expected
    # Both policies select their pods (and only them): nothing else in the namespace is isolated.
    for policy in policies:
        selected = [n for n, pod in (("uda-serve", serve), ("redis", redis), ("uda-proxy", proxy))
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
    shutil.copytree(DEPLOY, tmp_path / "deploy")  # the base pulls in deploy/haproxy
    tree = tmp_path / "deploy" / "kubernetes"
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
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    tree = tmp_path / "deploy" / "kubernetes"
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


def test_every_claim_a_job_mounts_is_shipped():
    """A Job mounting a PersistentVolumeClaim nothing creates stays Pending forever."""
    shipped = {r["metadata"]["name"] for p in JOB_FILES for r in load_documents(p)
               if r["kind"] == "PersistentVolumeClaim"}
    for path in JOB_TEMPLATES:
        (job,) = load_documents(path)
        claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims <= shipped, f"{path.name} mounts {sorted(claims - shipped)}, which no file in jobs/ creates"
