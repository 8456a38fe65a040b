"""The HTTP routes, one APIRouter per concern: inference, OIP v2 metadata and health,
operations, admin. Each route takes the runtime as a dependency and calls its methods; the app
(server/app.py) puts the runtime, its config and the admin token on app.state."""
from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import oip
from server.config import ServeConfig
from server.disconnects import unless_client_leaves
from server.errors import AdminAuthError
from server.http_errors import error_response
from server.metrics import CONTENT_TYPE
from server.responses import predict_body, v2_model_body
from server.runtime import ServeRuntime
from server.uploads import read_images

# The task-name rule of residual_store.stores.validate_task_name, in the schema so that clients
# (and fuzzers) see it; a name outside it is a 422 before any lookup.
TASK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TASK_DOC = "published task name (1-64 of A-Z a-z 0-9 _ . -, first a letter or digit)"
_STORE_DOC = ("required: 503 while the residual store is unreachable; optional: store problems "
              "are only reported (for a fleet's readiness probe: cached tasks keep serving)")


class ErrorBody(BaseModel):
    """Every error answer: a short name and one readable line."""

    error: str
    detail: str


_ERROR_TEXT = {400: "bad request or corrupt image", 401: "admin token missing",
               403: "wrong admin token", 404: "unknown task (or admin routes disabled)",
               408: "the upload did not arrive within --request-timeout",
               409: "conflicts with the configuration", 413: "upload too large",
               415: "not a JPEG, PNG or WebP image", 422: "invalid parameters",
               429: "queue full: retry after Retry-After seconds",
               499: "the client closed its connection first (logged and counted, never sent)",
               503: "not ready, shutting down, store unavailable or timed out"}


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}


_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    **{f"image/{k}": {"schema": {"type": "string", "format": "binary"}} for k in ("jpeg", "png", "webp")},
}}}
_V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "datatype": {"const": "BYTES"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
            "parameters": {"type": "object"}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"enum": list(oip.OUTPUTS)},
            "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean"},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
                "classification": {"type": "integer", "minimum": 1, "maximum": 1000}}}}}},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}}}}}},
    "description": "JSON; or JSON then binary tensor data (Triton's binary_tensor_data extension: "
                   "header Inference-Header-Content-Length, inputs with parameters.binary_data_size)"}}
_INFER_ERRORS = _errors(400, 404, 408, 413, 415, 422, 429, 499, 503)
_TASK_ERRORS = _errors(404, 422, 503)
_ADMIN_ERRORS = _errors(401, 403, 404, 422, 503)


def _task_path():
    return Path(..., pattern=TASK_PATTERN, description=_TASK_DOC)


def _version_path():
    return Path(..., ge=1, le=2**53, description="a published version of the task (1, 2, ...)")



def _runtime(request: Request) -> ServeRuntime:
    return request.app.state.runtime


def _config(request: Request) -> ServeConfig:
    return request.app.state.config


Runtime = Annotated[ServeRuntime, Depends(_runtime)]
Config = Annotated[ServeConfig, Depends(_config)]


def _task_known(request: Request, runtime: ServeRuntime, task: str):
    """For inference routes only: metadata and readiness calls that name a task are not
    inference requests, so they stay out of uda_requests_total and the latency histogram."""
    tv = runtime.require_task(task)
    request.state.uda_task = task  # a published name: safe as a metric label
    return tv


def _admin(request: Request) -> None:
    admin_token = request.app.state.admin_token
    if admin_token is None:
        raise StarletteHTTPException(404, "admin routes are disabled: start uda-serve with "
                                          "--admin-token or UDA_ADMIN_TOKEN")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AdminAuthError(401, "admin routes need the header 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
        raise AdminAuthError(403, "wrong admin token")


# -- inference ---------------------------------------------------------------------------------

inference = APIRouter()


@inference.post("/predict", responses=_INFER_ERRORS, openapi_extra=_IMAGE_BODY)
async def predict(request: Request, runtime: Runtime, cfg: Config,
                  task: str = Query(..., pattern=TASK_PATTERN, description=_TASK_DOC),
                  top_k: int = Query(5, ge=1, le=1000)):
    _task_known(request, runtime, task)
    uploads = await read_images(request, cfg.max_batch, cfg.max_image_bytes, cfg.request_timeout)
    return predict_body(await unless_client_leaves(request, runtime.infer(task, uploads)), top_k)


@inference.post("/v2/models/{task}/infer", responses=_INFER_ERRORS, openapi_extra=_V2_BODY)
async def v2_infer(request: Request, runtime: Runtime, cfg: Config, task: str = _task_path()):
    _task_known(request, runtime, task)
    return await _v2_infer(request, runtime, cfg, task)


@inference.post("/v2/models/{task}/versions/{version}/infer", responses=_INFER_ERRORS,
                openapi_extra=_V2_BODY)
async def v2_infer_version(request: Request, runtime: Runtime, cfg: Config,
                           task: str = _task_path(), version: int = _version_path()):
    _task_known(request, runtime, task)
    return await _v2_infer(request, runtime, cfg, task,
                           await oip.require_version(runtime, task, version))


async def _v2_infer(request: Request, runtime: ServeRuntime, cfg: ServeConfig, task: str,
                    version=None):
    infer = await oip.read_infer_request(request, cfg.max_batch, cfg.max_image_bytes,
                                         cfg.request_timeout, cfg.max_json_bytes or None)
    result = await unless_client_leaves(request, runtime.infer(task, infer.images, version))
    return oip.infer_response(result, infer)


# -- Open Inference Protocol v2 metadata and health --------------------------------------------

metadata = APIRouter()


@metadata.get("/v2")
async def v2_server_metadata():
    return oip.server_metadata()


@metadata.get("/v2/health/live")
async def v2_live():
    return {"live": True}


@metadata.get("/v2/health/ready", responses=_errors(503))
async def v2_ready(runtime: Runtime):
    problems = runtime.readiness()
    if problems:
        return error_response(503, "not ready", "; ".join(problems))
    return {"ready": True}


@metadata.get("/v2/models/{task}", responses=_TASK_ERRORS)
async def v2_model(runtime: Runtime, task: str = _task_path()):
    return v2_model_body(runtime.require_task(task))


@metadata.get("/v2/models/{task}/ready", responses=_TASK_ERRORS)
async def v2_model_ready(runtime: Runtime, task: str = _task_path()):
    tv = runtime.require_task(task)
    return {"name": task, "ready": True, "resident": runtime.is_resident(tv)}


@metadata.get("/v2/models/{task}/versions/{version}", responses=_TASK_ERRORS)
async def v2_model_version(runtime: Runtime, task: str = _task_path(),
                           version: int = _version_path()):
    runtime.require_task(task)
    return v2_model_body(await oip.require_version(runtime, task, version))


@metadata.get("/v2/models/{task}/versions/{version}/ready", responses=_TASK_ERRORS)
async def v2_model_version_ready(runtime: Runtime, task: str = _task_path(),
                                 version: int = _version_path()):
    runtime.require_task(task)
    tv = await oip.require_version(runtime, task, version)
    return {"name": task, "version": str(version), "ready": True,
            "resident": runtime.is_resident(tv)}


# -- operations --------------------------------------------------------------------------------

operations = APIRouter()


@operations.get("/tasks", responses=_errors(503))
async def tasks(runtime: Runtime):
    return {"tasks": runtime.task_entries()}


@operations.get("/healthz")
async def healthz(runtime: Runtime):
    return {"status": "alive", **runtime.describe()}


@operations.get("/readyz", responses=_errors(422, 503))
async def readyz(runtime: Runtime, store: Literal["required", "optional"] = Query(
        "required", description=_STORE_DOC)):
    problems = runtime.readiness(require_store=store == "required")
    store_problems = runtime.store_problems()
    if problems:
        return JSONResponse({"error": "not ready", "detail": "; ".join(problems),
                             "store_problems": store_problems, **runtime.describe()},
                            status_code=503)
    return {"status": "ready", "tasks": runtime.published_count(),
            "problems": runtime.startup_problems, "store_problems": store_problems,
            **runtime.describe()}


@operations.get("/metrics", response_class=PlainTextResponse)
async def metrics(runtime: Runtime):
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


# -- admin -------------------------------------------------------------------------------------

admin = APIRouter(dependencies=[Depends(_admin)])


@admin.post("/admin/tasks/{task}/load", responses={**_ADMIN_ERRORS, **_errors(409)})
async def admin_load(runtime: Runtime, task: str = _task_path()):
    return await runtime.load(task)


@admin.post("/admin/tasks/{task}/unload", responses={**_ADMIN_ERRORS, **_errors(409)})
async def admin_unload(runtime: Runtime, task: str = _task_path()):
    return runtime.unload(task)


@admin.post("/admin/reload", responses=_ADMIN_ERRORS)
async def admin_reload(runtime: Runtime):
    return await runtime.reload()


@admin.get("/admin/fingerprint", responses=_ADMIN_ERRORS)
async def admin_fingerprint(runtime: Runtime):
    """The base weights' sha256 now (any applied residual removed first) vs. at start."""
    return await runtime.fingerprint_report()


ROUTERS = (inference, metadata, operations, admin)
