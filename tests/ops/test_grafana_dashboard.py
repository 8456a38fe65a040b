"""deploy/grafana: the dashboard's structure and the provisioning (evaluated live elsewhere)."""
from __future__ import annotations

import configparser
import json

import yaml

from .support import DASHBOARD, DEPLOY

REQUIRED_PANELS = ("Latency p50 / p95 / p99 per task", "Request rate per task", "Error rate per task",
                   "Top tasks by traffic", "Batch size", "Swap time", "Residual load time",
                   "Cache hit ratio", "Resident tasks", "Evictions and misses", "Queue depth")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_task_variable_comes_from_the_latency_histogram():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    task = variables["task"]
    assert task["query"]["query"] == "label_values(uda_request_duration_seconds_count, task)"
    assert task["multi"] and task["includeAll"] and task["allValue"] == ".*"
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
