"""deploy/prometheus with promtool: the rules load, fire as their unit tests say, configs parse."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from server.app import create_app
from server.config import ServeConfig
from server.metrics import REFUSAL_REASONS

from .relabel_lite import pod_targets, relabel, scrape_url
from .support import DEPLOY, DOCKER, KUSTOMIZE, OVERLAYS, RULES, kustomize_build, pod_spec

UNIT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"
ALERTS = {"UdaTaskLatencyP99High", "UdaTaskErrorRatioHigh", "UdaResidualsRefused",
          "UdaStoreUnreachable", "UdaResidualCacheThrash", "UdaQueueNearFull", "UdaTargetDown",
          "UdaTargetsAbsent"}


def promtool(tools: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tools["promtool"], *args], capture_output=True, text=True)


def test_promtool_check_rules(prometheus_tools):
    done = promtool(prometheus_tools, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_their_unit_tests(prometheus_tools):
    done = promtool(prometheus_tools, "test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_documented():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    tested = {a["alertname"] for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
              for a in t.get("alert_rule_test", [])}
    assert tested == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_unit_tests_use_the_servers_refusal_reasons():
    """A made-up reason would test an alert for a series the server never exports."""
    reasons = set(re.findall(r'reason="(\w+)"', UNIT_TESTS.read_text()))
    assert reasons and reasons <= set(REFUSAL_REASONS), reasons - set(REFUSAL_REASONS)


def test_compose_prometheus_config(prometheus_tools):
    # --syntax-only: the rule glob points inside the container (/etc/prometheus/rules).
    done = promtool(prometheus_tools, "check", "config", "--syntax-only", str(DOCKER / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    serve = config["scrape_configs"][0]
    # Every replica of `--scale uda-serve=N`: Docker's DNS answers one A record per replica.
    assert serve["job_name"] == "uda-serve"  # what the rules' up{job="uda-serve"} selects
    assert serve["dns_sd_configs"] == [{"names": ["uda-serve"], "type": "A", "port": 8000,
                                        "refresh_interval": "15s"}]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_kubernetes_prometheus_sends_alerts_to_an_alertmanager():
    # Not through promtool: Debian's is built without Kubernetes service discovery.
    path = DEPLOY / "prometheus" / "prometheus-kubernetes.yaml"
    (am,) = yaml.safe_load(path.read_text())["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"]


def kubernetes_scrape_job() -> dict:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yaml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
    (job,) = config["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    return job


def scraped(job: dict, resources: list[dict], pod_ip: str = "10.1.2.3") -> list[tuple[dict, dict]]:
    """(workload, target labels after relabeling) for every pod `job` would scrape."""
    namespaces = job["kubernetes_sd_configs"][0]["namespaces"]["names"]
    out = []
    for r in resources:
        if pod_spec(r) is None or r["metadata"]["namespace"] not in namespaces:
            continue
        for labels in pod_targets(r["spec"]["template"], f"{r['metadata']['name']}-0",
                                  r["metadata"]["namespace"], pod_ip, job):
            if (kept := relabel(labels, job["relabel_configs"])) is not None:
                out.append((r, kept))
    return out


@pytest.mark.parametrize("layer", OVERLAYS)
def test_kubernetes_scrape_job_finds_each_server_pod_at_its_metrics(layer, tmp_path):
    # Debian's promtool is built without Kubernetes service discovery: discovery and
    # relabeling are replayed by relabel_lite on the rendered pods instead.
    resources = kustomize_build(KUSTOMIZE / layer)
    ((workload, target),) = scraped(kubernetes_scrape_job(), resources)  # not Redis, not twice
    assert (workload["kind"], workload["metadata"]["name"]) == ("Deployment", "uda-serve")
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    (c,) = pod_spec(workload)["containers"]
    (port,) = c["ports"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert f"--port={port['containerPort']}" in c["args"]  # where uda-serve listens
    routes = {r.path for r in create_app(ServeConfig(store=str(tmp_path))).routes}
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    assert scrape_url(target) == f"http://10.1.2.3:{port['containerPort']}/metrics"
    # The dashboard's $instance and the alerts' {{ $labels.instance }} name pods.
    assert target["instance"] == "uda-serve-0" and target["namespace"] == "uda"


def test_kubernetes_scrape_job_follows_the_annotations():
    """The rules read the annotations (they would pass by luck if they ignored them)."""
    job = kubernetes_scrape_job()
    deploy = next(r for r in kustomize_build(KUSTOMIZE / OVERLAYS[0])
                  if (r["kind"], r["metadata"]["name"]) == ("Deployment", "uda-serve"))
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    annotations.update({"prometheus.io/port": "9100", "prometheus.io/path": "/custom"})
    ((_, target),) = scraped(job, [deploy])
    assert scrape_url(target) == "http://10.1.2.3:9100/custom"
    annotations["prometheus.io/scrape"] = "false"
    assert scraped(job, [deploy]) == []
