"""deploy/grafana: the dashboard's structure, the shape of its PromQL (and the rules'), the
provisioning. test_live_prometheus.py evaluates the same queries on a real Prometheus.
"""
from __future__ import annotations

import configparser
import json
import re

import pytest
import yaml

from .support import DASHBOARD, DEPLOY, dashboard_targets, rule_expressions

REQUIRED_PANELS = ("Latency p50 / p95 / p99 per task", "Request rate per task", "Error rate per task",
                   "Top tasks by traffic", "Batch size", "Swap time", "Residual load time",
                   "Cache hit ratio", "Resident tasks", "Evictions and misses", "Queue depth")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_task_variable_comes_from_the_latency_histogram():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    task = variables["task"]
    assert task["query"]["query"] == "label_values(uda_request_duration_seconds_count, task)"
    # Hundreds of tasks: no "All" (hundreds of series per panel); Grafana selects the first
    # task, several may be picked, and the top-N panels cover every task.
    assert task["multi"] and not task.get("includeAll") and task["current"] == {}
    assert variables["datasource"]["type"] == "datasource"


def test_required_panels_exist_with_queries():
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert set(REQUIRED_PANELS) <= titles, set(REQUIRED_PANELS) - titles
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_fleet_panels_rank_every_task_whatever_is_selected():
    """The top-N panels read all tasks (no $task filter) and keep 10 of them."""
    panels = {p["title"]: p for p in dashboard()["panels"]}
    for title in ("Top tasks by traffic", "Top tasks by p99 latency", "Top tasks by 5xx rate"):
        (target,) = panels[title]["targets"]
        assert target["expr"].startswith("topk(10, ") and "$task" not in target["expr"], title
    assert "uda_task_version" in panels["Served version per task"]["targets"][0]["expr"]
    assert 'up{job="uda-serve"' in panels["Replicas up"]["targets"][0]["expr"]


def test_latency_panel_is_per_task():
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == REQUIRED_PANELS[0]]
    exprs = [t["expr"] for t in panel["targets"]]
    for q in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q}, sum by (task, le)") for e in exprs)


def test_layout_fits_the_grid_and_ids_are_unique():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_anonymous_access_is_off_by_default():
    ini = configparser.ConfigParser()
    ini.read(DEPLOY / "grafana" / "grafana.ini")
    assert ini.getboolean("auth.anonymous", "enabled") is False
    assert ini.getboolean("users", "allow_sign_up") is False


def test_provisioning_points_at_the_dashboard_and_prometheus():
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "vlp-uda.yaml").read_text())["providers"]
    compose = yaml.safe_load((DEPLOY.parent / "docker" / "compose.yaml").read_text())
    mount = next(v for v in compose["services"]["grafana"]["volumes"] if "dashboard.json" in v)
    assert mount.split(":")[1].startswith(provider["options"]["path"] + "/")


# -- PromQL shapes that evaluate fine and still show nonsense ------------------------------------

# histogram_quantile's second argument, the one form the dashboard and the rules use:
# sum by (LABELS) (rate(NAME{MATCHERS}[RANGE])), with `le` among LABELS and NAME a *_bucket.
_QUANTILE_INPUT = re.compile(r"\s*sum\s+by\s*\(([\w\s,]*)\)\s*\(\s*rate\(\s*([a-zA-Z_:][\w:]*)"
                             r"(?:\{[^{}]*\})?\[[^\]]+\]\s*\)\s*\)\s*")
_COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def call_arguments(expr: str, function: str) -> list[list[str]]:
    """The top-level arguments of every `function(...)` call in `expr`."""
    calls = []
    for m in re.finditer(rf"\b{function}\(", expr):
        args, depth, start, quoted = [], 0, m.end(), False
        for i in range(m.end(), len(expr)):
            ch = expr[i]
            if ch == '"' and expr[i - 1] != "\\":
                quoted = not quoted
            elif quoted:
                continue
            elif ch in "([{":
                depth += 1
            elif ch in ")]}" and depth:
                depth -= 1
            elif ch == ")" or (ch == "," and not depth):
                args.append(expr[start:i].strip())
                start = i + 1
                if ch == ")":
                    break
        calls.append(args)
    return calls


def quantile_problems(expr: str) -> list[str]:
    problems = []
    for args in call_arguments(expr, "histogram_quantile"):
        m = _QUANTILE_INPUT.fullmatch(args[1]) if len(args) == 2 else None
        if not m:
            problems.append(f"not sum by (..., le) (rate(NAME_bucket[...])): {args}")
        elif "le" not in {label.strip() for label in m.group(1).split(",")}:
            problems.append(f"`le` missing from the by clause: {args[1]}")
        elif not m.group(2).endswith("_bucket"):
            problems.append(f"{m.group(2)} is not a histogram's _bucket series")
    return problems


def raw_counters(expr: str) -> list[str]:
    """Counter series (and histogram parts) used other than directly inside rate/irate/increase."""
    found = []
    for m in re.finditer(r"\b(uda_\w+)", expr):
        if not m.group(1).endswith(_COUNTER_SUFFIXES):
            continue
        depth, i = 0, m.start() - 1
        while i >= 0 and not (expr[i] == "(" and depth == 0):
            depth += {")": 1, "(": -1}.get(expr[i], 0)
            i -= 1
        function = re.search(r"(\w*)\s*$", expr[:max(i, 0)]).group(1)
        if function not in {"rate", "irate", "increase"}:
            found.append(m.group(1))
    return found


def test_histogram_quantiles_read_bucket_rates_by_le():
    queries = [(w, t["expr"]) for w, t in dashboard_targets()] + rule_expressions()
    assert any("histogram_quantile(" in q for _, q in queries)
    problems = [f"{where}: {p}" for where, q in queries for p in quantile_problems(q)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("expr,problem", [
    ("histogram_quantile(0.9, sum by (le) (rate(uda_x_bucket[5m])))", None),
    ('histogram_quantile(0.9, sum by (task, le) (rate(uda_x_bucket{a=~"b,c"}[5m])))', None),
    ("histogram_quantile(0.9, sum by (task) (rate(uda_x_bucket[5m])))", "`le` missing"),
    ("histogram_quantile(0.9, sum by (le) (rate(uda_x_count[5m])))", "not a histogram"),
    ("histogram_quantile(0.9, uda_x_bucket)", "not sum by"),
])
def test_quantile_check_tells_good_from_bad(expr, problem):
    found = quantile_problems(expr)
    assert (found == []) if problem is None else (len(found) == 1 and problem in found[0]), found


def test_counters_are_plotted_as_rates_or_increases():
    """A counter's raw value only says how long a replica has run (and drops at each restart)."""
    raw = [f"{where}: {name}" for where, t in dashboard_targets() for name in raw_counters(t["expr"])]
    assert not raw, "\n".join(raw)
    assert raw_counters("sum by (reason) (uda_residuals_refused_total)") == ["uda_residuals_refused_total"]
    assert raw_counters("sum(increase(uda_residuals_refused_total[1h]))") == []
