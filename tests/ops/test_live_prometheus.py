"""The dashboard and the alert rules against a real Prometheus scraping a live uda-serve.

A directory store gets two tiny tasks (and one residual for a foreign base, which the server
must refuse); `uda-serve` serves it on a free port; Prometheus (Debian's package, installed
by scripts/ensure-prometheus.sh when missing) scrapes it every second with the project's
alert rules loaded; the test sends traffic to both tasks and then evaluates every dashboard
query and every rule expression through Prometheus' HTTP API.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from residual_store.stores import open_store

from .support import DASHBOARD, RULES, free_port, wait_for
from .tiny_tasks import MODEL, residual_blob

pytestmark = pytest.mark.integration

TASKS = ("Ar2Cl", "Pr2Rw")
FOREIGN = "Foreign"  # trained on another base: refused by the server
# What Grafana substitutes before a query reaches Prometheus (multi-value $task as a regex).
GRAFANA_VARS = {"task": "(" + "|".join(TASKS) + ")", "instance": ".*", "__rate_interval": "30s",
                "__range": "1m", "__interval": "2s", "datasource": "prometheus"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}


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
    dash = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} / {t['refId']}", grafana_expand(t["expr"]))
            for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


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


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture(scope="module")
def server(store_dir, tmp_path_factory):
    """Base URL of a live `uda-serve` on the tiny backbone."""
    uda_serve = Path(sys.executable).parent / "uda-serve"
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "uda-serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(uda_serve), "--model", MODEL, "--store", str(store_dir),
                                 "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"uda-serve exited with {proc.returncode}:\n{_log_tail(log)}")
        return True if httpx.get(f"{url}/readyz", timeout=5).status_code == 200 else None

    try:
        wait_for("uda-serve /readyz", ready, timeout=240)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus(prometheus_tools, server, tmp_path_factory):
    """Base URL of a Prometheus on loopback scraping `server` every second, rules loaded."""
    tmp = tmp_path_factory.mktemp("prometheus")
    target = server.removeprefix("http://")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "uda-serve", "static_configs": [{"targets": [target]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([prometheus_tools["prometheus"], f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{_log_tail(log)}")
        return True if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200 else None

    try:
        wait_for("Prometheus /-/ready", ready, timeout=60)
        yield url
    finally:
        _stop(proc)


def query(prometheus: str, promql: str) -> dict:
    """The JSON answer of /api/v1/query (status 'success' or 'error')."""
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=30).json()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def traffic(server, prometheus) -> int:
    """Two rounds of requests to both tasks, each seen by a scrape; returns the request count."""
    image = _png()
    sent = 0
    with httpx.Client(base_url=server, timeout=60) as client:
        for _ in range(2):
            for task in TASKS:
                for _ in range(3):
                    r = client.post("/predict", params={"task": task},
                                    files={"file": ("img.png", image, "image/png")})
                    assert r.status_code == 200, f"{task}: {r.status_code} {r.text[:300]}"
                    sent += 1
            total = f'sum(uda_requests_total{{task=~"{GRAFANA_VARS["task"]}"}})'
            wait_for(f"Prometheus to scrape {sent} requests", lambda: True if (
                (res := query(prometheus, total)["data"]["result"]) and float(res[0]["value"][1]) >= sent)
                else None, timeout=60)
    return sent


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


def test_per_task_latency_query_has_a_series_per_task(prometheus, traffic):
    (p99,) = [q for where, q in dashboard_queries()
              if where.startswith("Latency p50 / p95 / p99 per task") and q.startswith("histogram_quantile(0.99")]

    def both_tasks():
        found = {r["metric"].get("task") for r in query(prometheus, p99)["data"]["result"]}
        return found if set(TASKS) <= found else None

    assert set(TASKS) <= wait_for("a p99 latency series for each task", both_tasks, timeout=60)


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
    def refused():
        result = query(prometheus, "sum by (reason) (uda_residuals_refused_total)")["data"]["result"]
        return result if result and float(result[0]["value"][1]) >= 1 else None

    wait_for("uda_residuals_refused_total to count the foreign residual", refused, timeout=60)

    def alert():
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "UdaResidualsRefused"] or None

    assert wait_for("the UdaResidualsRefused alert", alert, timeout=60)[0]["state"] == "firing"
