"""Residual stores and `open_store(url)`, the one place that maps a URL to a backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from residual_store.stores.base import (
    DEFAULT_KEEP,
    ResidualStore,
    StoreEvent,
    TaskInfo,
    VersionInfo,
    validate_task_name,
)

__all__ = [
    "DEFAULT_KEEP",
    "ResidualStore",
    "StoreEvent",
    "TaskInfo",
    "VersionInfo",
    "open_store",
    "redact_url",
    "validate_task_name",
]

_EXAMPLES = "./residuals, file:///data/residuals or redis://redis:6379/0?prefix=uda:"


def redact_url(url: str, mask: str | None = "***") -> str:
    """`url` safe to print, log or store: a password in it becomes `mask`, or is dropped with
    its colon when mask is None. Anything that is not a URL with a password comes back as is."""
    parts = urlsplit(str(url))
    if not parts.password:
        return str(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    netloc = f"{user}@{host}" if mask is None else f"{user}:{mask}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(url: str | Path, **kw: Any) -> ResidualStore:
    """The store for `url`: a directory path or file:// URL, or a redis:// / rediss:// URL.

    Keyword arguments go to the store's constructor (e.g. keep=10). Nothing is contacted here:
    call ping() to check the store is reachable.
    """
    if isinstance(url, Path):
        url = str(url)
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty store URL {url!r}: use e.g. {_EXAMPLES}")
    # Backends are imported on demand: a directory user never needs redis-py loaded.
    if url.startswith(("redis://", "rediss://")):
        from residual_store.stores.redis_store import RedisStore

        return RedisStore(url, **kw)
    if url.startswith("file://"):
        if "?" in url:  # a directory store takes no settings: `?prefix=` is a mistake
            raise ValueError(f"file:// store URL {url!r} has a query ({url.split('?', 1)[1]!r}), "
                             "but a directory store takes no parameters: use e.g. "
                             "file:///data/residuals (prefix= is for redis:// URLs)")
        path = unquote(url[len("file://"):])
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        if not path:
            raise ValueError(f"file:// URL without a path: {url!r}; use e.g. {_EXAMPLES}")
        from residual_store.stores.directory import DirectoryStore

        return DirectoryStore(path, **kw)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"unsupported store URL scheme {scheme!r} in {url!r}: "
                         f"use e.g. {_EXAMPLES}")
    from residual_store.stores.directory import DirectoryStore

    return DirectoryStore(url, **kw)
