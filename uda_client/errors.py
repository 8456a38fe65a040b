"""Typed errors: what went wrong on the way (ConnectionFailed, Timeout) or what the server said
(ServerError and its subclasses, carrying its `{"error", "detail"}`)."""
from __future__ import annotations

import json


class UdaError(Exception):
    """Base class of every error this client raises."""


class ConnectionFailed(UdaError):
    """The server could not be reached (refused, reset, DNS), after the retries."""


class Timeout(UdaError):
    """No answer within the client's timeout, after the retries."""


class ServerError(UdaError):
    """The server answered an error: `status`, its short `error` name and its one-line `detail`;
    `retry_after` in seconds when it sent Retry-After."""

    def __init__(self, status: int, error: str, detail: str, retry_after: float | None = None):
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} {error}: {detail}" if detail else f"HTTP {status} {error}")


class BadRequest(ServerError):
    """400: a corrupt image or a malformed request."""


class UnknownTask(ServerError):
    """404: the task (or the version asked) is not served."""


class PayloadTooLarge(ServerError):
    """413: an image or a batch over the server's limits."""


class UnsupportedImage(ServerError):
    """415: not a JPEG, PNG or WebP image."""


class InvalidParameters(ServerError):
    """422: a parameter out of range (top_k, task name)."""


class Overloaded(ServerError):
    """429: the server's queue is full; retried after Retry-After."""


class Unavailable(ServerError):
    """503: starting, draining, store down or timed out; retried after Retry-After."""


_BY_STATUS = {400: BadRequest, 404: UnknownTask, 413: PayloadTooLarge, 415: UnsupportedImage,
              422: InvalidParameters, 429: Overloaded, 503: Unavailable}


def error_from_response(status: int, content: bytes, retry_after: float | None) -> ServerError:
    """The typed error of an error answer; a body that is not uda-serve's JSON (a proxy's HTML
    page) becomes its first line as the detail."""
    try:
        body = json.loads(content)
        error, detail = str(body["error"]), str(body.get("detail", ""))
    except (ValueError, TypeError, KeyError):
        text = content.decode("utf-8", "replace").strip()
        error, detail = "error", text.splitlines()[0][:300] if text else ""
    return _BY_STATUS.get(status, ServerError)(status, error, detail, retry_after)
