"""Domain exceptions of the server core; app.py translates them (and residual_store's) to HTTP."""
from __future__ import annotations


class ServeError(Exception):
    """Base class of every error the server raises on purpose."""


class ImageRejected(ServeError):
    """An upload the server will not decode; `kind` picks the HTTP status at the edge."""

    def __init__(self, kind: str, message: str):
        # kind: "not_image" (415), "corrupt" (400), "too_large" (413), "bad_request" (400),
        # "timeout" (408: the body did not arrive within --request-timeout)
        self.kind = kind
        super().__init__(message)


class QueueFull(ServeError):
    """The total queue is at --max-queue: the client should retry later (429)."""


class RequestTimeout(ServeError):
    """A request waited longer than --request-timeout for its answer (503)."""


class ShuttingDown(ServeError):
    """The server is draining or stopped and takes no new work (503)."""


class NotReady(ServeError):
    """The base model is still loading (503)."""


class TaskUnavailable(ServeError):
    """A published task that cannot be served right now (refused residual, cache too small, store
    down while it is not resident) (503)."""


class CacheFull(TaskUnavailable):
    """A residual that does not fit in --cache-bytes next to the pinned ones."""


class AdminAuthError(ServeError):
    """Missing (401) or wrong (403) admin bearer token."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


class Conflict(ServeError):
    """An admin action that contradicts the configuration (e.g. unloading a pinned task) (409)."""


class ClientGone(ServeError):
    """The client closed its connection before its answer was ready; the work is dropped and the
    request is logged and counted as 499 (the answer is never sent)."""


class VersionNotServed(ServeError):
    """An Open Inference Protocol request for a version of a task other than the served one (404)."""
