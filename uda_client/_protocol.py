"""What the sync and asyncio clients share: building requests, the retry policy, reading answers.

Retries: a 429 or 503 is retried after the server's Retry-After (capped by `max_wait`), else
after `backoff * 2**attempt`; a refused connection the same way (nothing was sent). A timeout or
a connection lost mid-request is not retried by default: the prediction may be running, and
repeating it doubles the load exactly when the server is slow (`retry_timeouts=True` allows it;
a prediction is safe to repeat).
"""
from __future__ import annotations

import dataclasses
import email.utils
import time
from typing import Any

import httpx

from uda_client.errors import ConnectionFailed, ServerError, Timeout, error_from_response
from uda_client.images import ImageInput, as_parts
from uda_client.results import PredictResult, TaskInfo

RETRY_STATUSES = frozenset({429, 503})
DEFAULT_URL = "http://127.0.0.1:8000"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3  # further attempts after the first
    backoff: float = 0.5  # seconds before the first retry without Retry-After, doubled each time
    max_wait: float = 30.0  # longest sleep before a retry, whatever Retry-After says
    retry_timeouts: bool = False  # also retry timeouts and connections lost mid-request

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_wait < 0:
            raise ValueError(f"retries {self.retries}, backoff {self.backoff} and max_wait "
                             f"{self.max_wait} must be >= 0")

    def delay(self, attempt: int, retry_after: float | None) -> float:
        wait = retry_after if retry_after is not None else self.backoff * 2 ** attempt
        return min(max(wait, 0.0), self.max_wait)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


@dataclasses.dataclass(frozen=True)
class Call:
    """One HTTP call as both clients send it, and how to read its answer."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"params": self.params, "files": self.files}


def predict_call(images: ImageInput | list | tuple, task: str, top_k: int) -> tuple[Call, list[str]]:
    if not isinstance(task, str) or not task:
        raise ValueError("task must be a published task name, e.g. task='Ar2Cl'")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k {top_k!r} must be an integer >= 1")
    parts = as_parts(images)
    files = [("file", part) for part in parts]
    return Call("POST", "/predict", {"task": task, "top_k": top_k}, files), [p[0] for p in parts]


def chunks(items: list, size: int) -> list[list]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size {size!r} must be an integer >= 1")
    return [items[i:i + size] for i in range(0, len(items), size)]


def check(response: httpx.Response) -> httpx.Response:
    """`response` when it is a success; its typed ServerError otherwise."""
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.content,
                                  retry_after_seconds(response.headers.get("retry-after")))
    return response


def retryable(error: Exception, policy: RetryPolicy) -> bool:
    if isinstance(error, ServerError):
        return error.status in RETRY_STATUSES
    if isinstance(error, httpx.ConnectError):
        return True
    return policy.retry_timeouts and isinstance(error, (httpx.TimeoutException, httpx.RemoteProtocolError,
                                                        httpx.ReadError))


def final_error(error: Exception, url: str) -> Exception:
    """The typed error to raise once retries are spent."""
    if isinstance(error, ServerError):
        return error
    if isinstance(error, httpx.TimeoutException):
        return Timeout(f"no answer from {url} within the timeout ({type(error).__name__})")
    if isinstance(error, httpx.TransportError):
        return ConnectionFailed(f"cannot reach {url}: {error or type(error).__name__}")
    return error


def predict_result(response: httpx.Response, names: list[str], started: float) -> PredictResult:
    return PredictResult.from_json(response.json(), names, (time.perf_counter() - started) * 1e3)


def task_list(response: httpx.Response) -> list[TaskInfo]:
    return [TaskInfo.from_json(entry) for entry in response.json()["tasks"]]
