"""The dashboard and the alert rules against a real Prometheus scraping a live uda-serve.

A directory store gets two tiny tasks (and one residual for a foreign base, which the server
must refuse); `uda-serve` serves it on a free port; Prometheus (Debian's package, installed
by scripts/ensure-prometheus.sh when missing) scrapes it every second with the project's
alert rules loaded; the test sends traffic to both tasks (good images and one the server
refuses) and then evaluates every dashboard query and every rule expression through
Prometheus' HTTP API, at the moment the traffic ended: each must succeed, and each panel must
show data, with the labels its legend names, for both tasks.
"""
from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from residual_store.stores import open_store

from .support import (DASHBOARD, RULES, dashboard_targets, free_port, live_process,
                      rule_expressions, wait_for)
from .tiny_tasks import MODEL, residual_blob

pytestmark = pytest.mark.integration

TASKS = ("Ar2Cl", "Pr2Rw")
FOREIGN = "Foreign"  # trained on another base: refused by the server
# What Grafana substitutes before a query reaches Prometheus (multi-value $task as a regex).
GRAFANA_VARS = {"task": "(" + "|".join(TASKS) + ")", "instance": ".*", "__rate_interval": "30s",
                "__range": "1m", "__interval": "2s", "datasource": "prometheus"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
# The dashboard targets allowed to be empty: 5xx per task (the traffic causes none).
MAY_BE_EMPTY = {"Error rate per task / A", "Top tasks by 5xx rate / A"}


# -- what the dashboard and the rules ask for ----------------------------------------------------

def grafana_expand(expr: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise AssertionError(f"dashboard uses ${name}, unknown to this test: {expr}")
        return GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL as Grafana sends it) for every panel target."""
    return [(where, grafana_expand(target["expr"])) for where, target in dashboard_targets()]


def variable_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]


def metric_names(texts: list[str]) -> set[str]:
    return {n for text in texts for n in re.findall(r"\b(uda_[a-z0-9_]+)", text)}


# -- the live stack ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store")
    store = open_store(path)
    for seed, task in enumerate(TASKS, start=1):
        store.publish(task, residual_blob(task, seed))
    store.publish(FOREIGN, residual_blob(FOREIGN, 9, base_fingerprint="0" * 64))
    return path


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    """Base URL of a live `uda-serve` on the tiny backbone."""
    uda_serve = Path(sys.executable).parent / "uda-serve"
    url = f"http://127.0.0.1:{free_port()}"
    argv = [str(uda_serve), "--model", MODEL, "--pretrained", "random", "--store", str(store_dir),
            "--device", "cpu", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--log-level", "warning"]
    with live_process("uda-serve", argv, tmp_path_factory.mktemp("serve") / "uda-serve.log",
                      f"{url}/readyz"):
        yield url


@pytest.fixture(scope="module")
def prometheus(prometheus_tools, server, tmp_path_factory):
    """Base URL of a Prometheus on loopback scraping `server` every second, rules loaded."""
    tmp = tmp_path_factory.mktemp("prometheus")
    target = server.removeprefix("http://")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "uda-serve", "static_configs": [{"targets": [target]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    argv = [prometheus_tools["prometheus"], f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"]
    with live_process("prometheus", argv, tmp / "prometheus.log", f"{url}/-/ready", timeout=60):
        yield url


def query(prometheus: str, promql: str, at: float | None = None) -> dict:
    """The JSON answer of /api/v1/query (status 'success' or 'error'), now or at time `at`."""
    params = {"query": promql} | ({"time": f"{at:.3f}"} if at is not None else {})
    return httpx.get(f"{prometheus}/api/v1/query", params=params, timeout=30).json()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


class Traffic(NamedTuple):
    requests: int  # answered requests, refused ones included
    at: float  # Unix time once Prometheus had scraped them all: the panels' moment


@pytest.fixture(scope="module")
def traffic(server, prometheus) -> Traffic:
    """Two rounds of requests to both tasks, each seen by a scrape. Per round and task three
    images and one body that is not an image (a 4xx, so the error panel has a series)."""
    image = _png()
    sent = 0
    with httpx.Client(base_url=server, timeout=60) as client:
        for _ in range(2):
            for task in TASKS:
                for _ in range(3):
                    r = client.post("/predict", params={"task": task},
                                    files={"file": ("img.png", image, "image/png")})
                    assert r.status_code == 200, f"{task}: {r.status_code} {r.text[:300]}"
                r = client.post("/predict", params={"task": task}, content=b"not an image",
                                headers={"content-type": "image/png"})
                assert 400 <= r.status_code < 500, f"{task}: {r.status_code} {r.text[:300]}"
                sent += 4
            total = f'sum(uda_requests_total{{task=~"{GRAFANA_VARS["task"]}"}})'
            wait_for(f"Prometheus to scrape {sent} requests", lambda: True if (
                (res := query(prometheus, total)["data"]["result"]) and float(res[0]["value"][1]) >= sent)
                else None, timeout=60)
    at = float(query(prometheus, "time()")["data"]["result"][1])
    return Traffic(sent, at)


# -- the tests -----------------------------------------------------------------------------------

def test_metric_names_of_dashboard_and_rules_are_served(server):
    served = set()
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics", timeout=10).text):
        served |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
        served |= {s.name for s in family.samples}
    used = metric_names([q for _, q in dashboard_queries()] + [e for _, e in rule_expressions()]
                        + variable_queries())
    assert used, "no uda_* metric found in the dashboard and rules"
    assert used <= served, f"not exposed by uda-serve /metrics: {sorted(used - served)}"


def test_every_dashboard_query_evaluates(prometheus, traffic):
    failures = [f"{where}: {ans.get('error')}\n    {promql}" for where, promql in dashboard_queries()
                if (ans := query(prometheus, promql))["status"] != "success"]
    assert not failures, "\n".join(failures)


def test_every_panel_shows_data_for_both_tasks(prometheus, traffic):
    """Each target returns series at the end of the traffic, carrying every label its legend
    names, and one per task where the legend names the task: a wrong label or metric name
    would evaluate fine and show nothing."""
    problems = []
    for where, target in dashboard_targets():
        result = query(prometheus, grafana_expand(target["expr"]), at=traffic.at)["data"]["result"]
        if not result:
            if where not in MAY_BE_EMPTY:
                problems.append(f"{where}: no data")
            continue
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        missing = {name for r in result for name in legend if name not in r["metric"]}
        if missing:
            problems.append(f"{where}: series without {sorted(missing)}")
        if "task" in legend and not set(TASKS) <= {r["metric"].get("task") for r in result}:
            problems.append(f"{where}: not a series per task: {[r['metric'] for r in result]}")
    assert not problems, "\n".join(problems)


def test_per_task_p99_latency_is_a_real_duration(prometheus, traffic):
    (p99,) = [q for where, q in dashboard_queries()
              if where.startswith("Latency p50 / p95 / p99 per task") and q.startswith("histogram_quantile(0.99")]
    result = query(prometheus, p99, at=traffic.at)["data"]["result"]
    values = {r["metric"]["task"]: float(r["value"][1]) for r in result}
    assert set(values) == set(TASKS)
    # NaN (no rate in the window) or +Inf (every observation past the last bucket) mean the
    # panel shows nothing useful.
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values


def test_task_variable_lists_both_tasks(prometheus, traffic):
    (task_query,) = [q for q in variable_queries() if q.endswith(", task)")]
    metric = re.fullmatch(r"label_values\((\w+), task\)", task_query).group(1)
    answer = httpx.get(f"{prometheus}/api/v1/label/task/values", params={"match[]": metric}, timeout=30).json()
    assert answer["status"] == "success"
    assert set(TASKS) <= set(answer["data"])


def test_every_alert_expression_evaluates(prometheus, traffic):
    failures = [f"{name}: {ans.get('error')}" for name, expr in rule_expressions()
                if (ans := query(prometheus, expr))["status"] != "success"]
    assert not failures, "\n".join(failures)


def test_loaded_rules_evaluate_without_errors(prometheus, traffic):
    def evaluated():
        rules = [r for g in httpx.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
                 for r in g["rules"]]
        if rules and all(not r.get("lastEvaluation", "").startswith("0001-") for r in rules):
            return rules
        return None

    rules = wait_for("every rule to be evaluated once", evaluated, timeout=60)
    assert {r["name"] for r in rules} == {name for name, _ in rule_expressions()}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_refused_residual_is_counted_and_alerts(prometheus, traffic):
    """The foreign-base residual shows up in uda_residuals_refused_total and fires its alert."""
    refused = 'sum by (reason) (uda_residuals_refused_total{reason="base_mismatch"})'
    wait_for("uda_residuals_refused_total to count the foreign residual", lambda: True if (
        (res := query(prometheus, refused)["data"]["result"]) and float(res[0]["value"][1]) >= 1)
        else None, timeout=60)

    def alert():
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "UdaResidualsRefused"] or None

    (firing,) = wait_for("the UdaResidualsRefused alert", alert, timeout=60)
    assert firing["state"] == "firing" and firing["labels"]["reason"] == "base_mismatch"
