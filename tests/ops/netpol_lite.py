"""Whether Kubernetes NetworkPolicies let a connection into a pod, for the subset deploy/ uses.

There is no cluster (or CNI) here, so this follows the NetworkPolicy rules of the Kubernetes
API reference for ingress: a pod selected by any Ingress policy of its namespace is isolated,
and a connection to it is allowed when one rule of one such policy admits both the source
(podSelector: pods of the policy's namespace; namespaceSelector: pods of those namespaces;
both: both) and the port. Egress, ipBlock and other fields it does not model are refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SPEC_FIELDS = {"podSelector", "policyTypes", "ingress"}
PEER_FIELDS = {"podSelector", "namespaceSelector"}


@dataclasses.dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = dataclasses.field(default_factory=dict)  # named container ports

    @property
    def namespace_labels(self) -> dict[str, str]:
        # Set by the API server on every namespace since Kubernetes 1.22.
        return {"kubernetes.io/metadata.name": self.namespace}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions); {} selects everything."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], set(expr.get("values", []))
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def allowed(policies: list[dict[str, Any]], source: Pod, target: Pod, port: int,
            protocol: str = "TCP") -> bool:
    """Whether `source` may open a connection to `target` on `port`."""
    isolating = [p for p in policies if _isolates(p, target)]
    return not isolating or any(
        _from_ok(rule.get("from"), p["metadata"]["namespace"], source)
        and _port_ok(rule.get("ports"), target, port, protocol)
        for p in isolating for rule in p["spec"].get("ingress", []))


def _isolates(policy: dict[str, Any], target: Pod) -> bool:
    spec = policy["spec"]
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        raise ValueError(f"NetworkPolicy fields {sorted(unknown)} are not modelled by netpol_lite")
    types = spec.get("policyTypes", ["Ingress"])
    return (policy["metadata"]["namespace"] == target.namespace and "Ingress" in types
            and selects(spec["podSelector"], target.labels))


def _from_ok(peers: list[dict[str, Any]] | None, namespace: str, source: Pod) -> bool:
    if not peers:  # no `from`: every source
        return True
    for peer in peers:
        unknown = set(peer) - PEER_FIELDS
        if unknown:
            raise ValueError(f"NetworkPolicy peers {sorted(unknown)} are not modelled by netpol_lite")
        ns_ok = (selects(peer["namespaceSelector"], source.namespace_labels)
                 if "namespaceSelector" in peer else source.namespace == namespace)
        if ns_ok and selects(peer.get("podSelector", {}), source.labels):
            return True
    return False


def _port_ok(ports: list[dict[str, Any]] | None, target: Pod, port: int, protocol: str) -> bool:
    if not ports:  # no `ports`: every port
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:  # a protocol alone: every port
            return True
        # A named port is the target container's port of that name (none: no match).
        first = target.ports.get(p["port"]) if isinstance(p["port"], str) else p["port"]
        if first is not None and first <= port <= p.get("endPort", first):
            return True
    return False
