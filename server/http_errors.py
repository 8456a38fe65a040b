"""The one error boundary: domain exceptions -> HTTP status and a JSON `{"error", "detail"}` body.

Deliberate errors (ours, residual_store's, Starlette's HTTPException, request validation) pass
through this table; anything else is logged with its traceback and answered with a generic
500 that reveals nothing internal.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from residual_store.errors import (
    InvalidTaskName,
    ResidualStoreError,
    StoreUnavailable,
    UnknownTask,
)
from server.errors import (
    AdminAuthError,
    ClientGone,
    Conflict,
    ImageRejected,
    NotReady,
    QueueFull,
    RequestTimeout,
    ServeError,
    ShuttingDown,
    TaskUnavailable,
    VersionNotServed,
)
from server.log_hygiene import public_detail

logger = logging.getLogger(__name__)

_IMAGE_STATUS = {"not_image": (415, "unsupported media type"), "corrupt": (400, "corrupt image"),
                 "too_large": (413, "payload too large"), "bad_request": (400, "bad request"),
                 "timeout": (408, "request timeout")}
_RETRY_AFTER_S = {QueueFull: "1", RequestTimeout: "1", ShuttingDown: "5", NotReady: "5",
                  TaskUnavailable: "5", StoreUnavailable: "5"}


def error_response(status: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def classify(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, short error name) of a deliberate exception."""
    if isinstance(exc, (ClientGone, ClientDisconnect)):
        return 499, "client closed request"  # nginx's code: the answer is never sent
    if isinstance(exc, ImageRejected):
        return _IMAGE_STATUS.get(exc.kind, (400, "bad request"))
    if isinstance(exc, UnknownTask):
        return 404, "unknown task"
    if isinstance(exc, VersionNotServed):
        return 404, "unknown version"
    if isinstance(exc, InvalidTaskName):
        return 400, "invalid task name"
    if isinstance(exc, QueueFull):
        return 429, "overloaded"
    if isinstance(exc, AdminAuthError):
        return exc.status, "unauthorized" if exc.status == 401 else "forbidden"
    if isinstance(exc, Conflict):
        return 409, "conflict"
    if isinstance(exc, RequestTimeout):
        return 503, "timeout"
    if isinstance(exc, (ShuttingDown, NotReady)):
        return 503, "unavailable"
    if isinstance(exc, TaskUnavailable):
        return 503, "task unavailable"
    if isinstance(exc, StoreUnavailable):
        return 503, "store unavailable"
    return 503, "residual store error"  # other ResidualStoreError: the server side's problem


def _headers(exc: BaseException, status: int) -> dict[str, str] | None:
    for cls, seconds in _RETRY_AFTER_S.items():
        if isinstance(exc, cls):
            return {"Retry-After": seconds}
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return None


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    status, error = classify(exc)
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    elif status == 499:
        logger.info("%s %s -> 499: %s", request.method, request.url.path,
                    str(exc) or "the client closed its connection during the upload")
    # Details can quote a residual's metadata or a store path: escaped, no absolute paths.
    return error_response(status, error, public_detail(str(exc)), _headers(exc, status))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    from http import HTTPStatus

    try:
        error = HTTPStatus(exc.status_code).phrase.lower()
    except ValueError:
        error = "error"
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, error, detail, getattr(exc, "headers", None))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = " ".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}".strip(": "))
    return error_response(422, "invalid request", "; ".join(parts) or "invalid request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", "the server failed; the error is in its log")


def install_error_boundary(app: FastAPI) -> None:
    app.add_exception_handler(ServeError, _domain)
    app.add_exception_handler(ResidualStoreError, _domain)
    app.add_exception_handler(ClientDisconnect, _domain)  # hung up mid-upload: not our failure
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
