"""Prometheus' Kubernetes pod discovery and `relabel_configs`, for the subset deploy/ uses.

Debian's promtool is built without Kubernetes service discovery and there is no cluster here,
so this builds the labels `kubernetes_sd_configs` (role: pod) gives a pod's container ports and
applies relabel rules to them with Prometheus' semantics (source labels joined by the
separator, regex anchored at both ends, $N in the replacement, an empty result deletes the
label). Actions other than keep, drop and replace, and fields it does not know, are refused.
"""
from __future__ import annotations

import re
from typing import Any

DEFAULTS = {"separator": ";", "regex": "(.*)", "replacement": "$1", "action": "replace"}
FIELDS = {"source_labels", "separator", "regex", "target_label", "replacement", "action"}


def sanitize(name: str) -> str:
    """A Kubernetes label or annotation name as a Prometheus label name suffix."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod_template: dict[str, Any], pod_name: str, namespace: str, pod_ip: str,
                job: dict[str, Any]) -> list[dict[str, str]]:
    """The discovered labels of each container port of a pod made from `pod_template`."""
    meta = pod_template.get("metadata", {})
    common = {"job": job["job_name"], "__scheme__": job.get("scheme", "http"),
              "__metrics_path__": job.get("metrics_path", "/metrics"),
              "__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod_name,
              "__meta_kubernetes_pod_ip": pod_ip}
    common |= {f"__meta_kubernetes_pod_label_{sanitize(k)}": v for k, v in meta.get("labels", {}).items()}
    common |= {f"__meta_kubernetes_pod_annotation_{sanitize(k)}": v
               for k, v in meta.get("annotations", {}).items()}
    targets = []
    for c in pod_template["spec"]["containers"]:
        for port in c.get("ports", []):
            targets.append({**common, "__address__": f"{pod_ip}:{port['containerPort']}",
                            "__meta_kubernetes_pod_container_name": c["name"],
                            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                            "__meta_kubernetes_pod_container_port_number": str(port["containerPort"])})
    return targets


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """`labels` after `configs`, or None when a keep/drop rule drops the target."""
    labels = dict(labels)
    for raw in configs:
        unknown = set(raw) - FIELDS
        if unknown:
            raise ValueError(f"relabel fields {sorted(unknown)} are not modelled by relabel_lite")
        cfg = {**DEFAULTS, **raw}
        value = cfg["separator"].join(labels.get(n, "") for n in cfg.get("source_labels", []))
        match = re.fullmatch(cfg["regex"], value)
        if cfg["action"] == "keep":
            if not match:
                return None
        elif cfg["action"] == "drop":
            if match:
                return None
        elif cfg["action"] == "replace":
            if match:
                new = _expand(cfg["replacement"], match)
                if new:
                    labels[cfg["target_label"]] = new
                else:
                    labels.pop(cfg["target_label"], None)
        else:
            raise ValueError(f"relabel action {cfg['action']!r} is not modelled by relabel_lite")
    return labels


def scrape_url(labels: dict[str, str]) -> str:
    return f"{labels['__scheme__']}://{labels['__address__']}{labels['__metrics_path__']}"


def _expand(template: str, match: re.Match) -> str:
    # Go's regexp.Expand: $name takes the longest run of word characters (so "$1x" is the
    # group named "1x", which is empty) and ${1} delimits it; an unknown group is empty.
    def group(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        try:
            return match.group(int(name) if name.isdigit() else name) or ""
        except IndexError:
            return ""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", group, template)
