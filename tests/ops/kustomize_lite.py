"""Render a kustomization the way `kustomize build` does, for the subset deploy/ uses.

kustomize/kubectl are not installed where the tests run, so this models exactly the fields
deploy/kubernetes uses (resources, namespace, labels, images, strategic-merge patches) and
refuses any other field: a new kustomize feature in deploy/ fails the tests loudly instead of
being silently ignored. `set_image` is `kustomize edit set image NAME=NEWNAME:NEWTAG`, the one
edit the README tells users to make.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
# Fields of an `images:` entry modelled here (kustomize also knows `digest`).
IMAGE_FIELDS = {"name", "newName", "newTag"}
# Kinds that live outside namespaces (kustomize's `namespace:` leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass"}
# Strategic-merge keys of the Kubernetes list fields deploy/ patches (others are replaced).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kustomize build directory` would print (order aside)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which "
                         "tests/ops/kustomize_lite.py does not model: extend it")
    resources: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        resources += render(path) if path.is_dir() else load_documents(path)
    for patch in kust.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"only file patches ({{path: ...}}) are modelled, not {patch}")
        for doc in load_documents(directory / patch["path"]):
            target = _find(resources, doc["kind"], doc["metadata"]["name"])
            merged = strategic_merge(target, doc)
            target.clear()
            target.update(merged)
    for res in resources:
        _apply_images(res, kust.get("images", []))
        if "namespace" in kust and res["kind"] not in CLUSTER_SCOPED:
            res.setdefault("metadata", {})["namespace"] = kust["namespace"]
        for entry in kust.get("labels", []):
            if entry.get("includeSelectors") or entry.get("includeTemplates"):
                raise ValueError("labels with includeSelectors/includeTemplates are not modelled")
            res.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    return resources


def _find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    if len(hits) != 1:
        raise ValueError(f"patch target {kind}/{name} matches {len(hits)} resources")
    return hits[0]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge: maps merge, keyed lists merge by key, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    key = MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        out = copy.deepcopy(base)
        for item in patch:
            match = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = strategic_merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a Deployment/StatefulSet/Job/..., or None."""
    spec = resource.get("spec", {})
    if resource["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("spec")


def set_image(directory: Path, arg: str) -> None:
    """`kustomize edit set image NAME=NEWNAME:NEWTAG` run in `directory`: the entry for NAME
    is replaced (or added), entries stay sorted by name, as kustomize writes them."""
    name, sep, new = arg.partition("=")
    new_name, colon, new_tag = new.rpartition(":")
    if not (sep and colon and name and new_name and new_tag) or "/" in new_tag or "@" in new:
        raise ValueError(f"only `set image NAME=NEWNAME:NEWTAG` is modelled, not {arg!r}")
    path = directory / "kustomization.yaml"
    kust = yaml.safe_load(path.read_text())
    images = {i["name"]: i for i in kust.get("images", [])}
    images[name] = {"name": name, "newName": new_name, "newTag": new_tag}
    kust["images"] = [images[n] for n in sorted(images)]
    path.write_text(yaml.safe_dump(kust, sort_keys=False))


def _apply_images(resource: dict[str, Any], images: list[dict[str, str]]) -> None:
    unknown = {f for image in images for f in image} - IMAGE_FIELDS
    if unknown:
        raise ValueError(f"images: {sorted(unknown)} not modelled by tests/ops/kustomize_lite.py")
    spec = pod_spec(resource)
    if not spec:
        return
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name = _image_name(container["image"])
        for image in images:
            if image["name"] == name:
                new_name = image.get("newName", name)
                container["image"] = f"{new_name}:{image['newTag']}" if "newTag" in image else new_name


def _image_name(ref: str) -> str:
    """`registry:5000/app:tag@sha256:...` -> `registry:5000/app` (what `images[].name` matches)."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last
