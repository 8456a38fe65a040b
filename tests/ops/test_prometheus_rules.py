"""deploy/prometheus with promtool: the rules load, fire as their unit tests say, configs parse."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from .support import DEPLOY, DOCKER, RULES

UNIT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"
ALERTS = {"UdaTaskLatencyP99High", "UdaTaskErrorRatioHigh", "UdaResidualsRefused",
          "UdaStoreUnreachable", "UdaResidualCacheThrash", "UdaQueueNearFull"}


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


def test_compose_prometheus_config(prometheus_tools):
    # --syntax-only: the rule glob points inside the container (/etc/prometheus/rules).
    done = promtool(prometheus_tools, "check", "config", "--syntax-only", str(DOCKER / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["uda-serve:8000"]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]


def test_kubernetes_prometheus_config_scrapes_the_annotated_pods():
    # Debian's promtool is built without Kubernetes service discovery, so check the shape here.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yaml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    relabel = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]["regex"] == "uda-serve"
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
