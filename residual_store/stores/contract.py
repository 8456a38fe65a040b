"""What a task promises its clients: its class list and its base. A publish that changes either
(a 4-class task replaced by a 5-class residual, or one trained on another base) breaks every
client of the task, so publishers (`uda-train --publish`, `uda-store import`) refuse it unless
told otherwise (`--allow-class-change`)."""
from __future__ import annotations

import json

from residual_store.errors import ResidualStoreError, UnknownTask
from residual_store.stores.base import ResidualStore

ALLOW_FLAG = "--allow-class-change"
BASE_KEYS = ("base_model", "base_pretrained", "base_fingerprint")


class TaskContractChanged(ResidualStoreError, ValueError):
    """A publish would change an existing task's classes or base."""


def _classes(metadata: dict[str, str]) -> list[str] | None:
    try:
        classes = json.loads(metadata["classes"])
    except (KeyError, TypeError, ValueError):
        return None
    return classes if isinstance(classes, list) else None


def _few(names: list[str]) -> str:
    return repr(names) if len(names) <= 6 else repr(names[:6])[:-1] + ", ...]"


def contract_changes(current: dict[str, str], new: dict[str, str]) -> list[str]:
    """What `new` (a residual's metadata) changes of the task whose current version has
    metadata `current`; empty when nothing."""
    changes = []
    old_c, new_c = _classes(current), _classes(new)
    if old_c != new_c and old_c is not None and new_c is not None:
        added = [c for c in new_c if c not in old_c]
        removed = [c for c in old_c if c not in new_c]
        if added or removed:
            changes.append(f"classes {len(old_c)} -> {len(new_c)} (added {_few(added)}, removed "
                           f"{_few(removed)})")
        else:
            changes.append(f"class order {_few(old_c)} -> {_few(new_c)}")
    for key in BASE_KEYS:
        before, after = current.get(key), new.get(key)
        if before is not None and after is not None and before != after:
            shown = (lambda v: v[:12]) if key == "base_fingerprint" else (lambda v: v)
            changes.append(f"{key} {shown(before)} -> {shown(after)}")
    return changes


def check_replacement(store: ResidualStore, task: str, metadata: dict[str, str],
                      allow: bool = False) -> None:
    """TaskContractChanged when `task` exists in `store` and `metadata` changes its classes or
    base, unless `allow`."""
    if allow:
        return
    try:
        current = store.info(task)
    except UnknownTask:
        return
    changes = contract_changes(current.metadata, metadata)
    if changes:
        raise TaskContractChanged(
            f"task {task!r} in {store.url} (v{current.version}) would change: "
            f"{'; '.join(changes)}. Its clients expect the old classes and base: publish under "
            f"another task name, or pass {ALLOW_FLAG} to replace it on purpose")
