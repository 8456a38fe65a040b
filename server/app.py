"""The FastAPI application: routes only. Work happens in runtime.py, errors in http_errors.py."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config import ServeConfig
from server.errors import AdminAuthError
from server.http_errors import error_response, install_error_boundary
from server.metrics import CONTENT_TYPE
from server.request_metrics import RequestMetricsMiddleware
from server.responses import predict_body, v2_infer_body, v2_model_body
from server.runtime import ServeRuntime
from server.uploads import read_images, read_v2_images

logger = logging.getLogger(__name__)


def create_app(config: ServeConfig, runtime: ServeRuntime | None = None) -> FastAPI:
    """The app for `config`; builds the runtime at startup unless given a started one."""
    runtime = runtime or ServeRuntime(config)
    admin_token = config.resolved_admin_token()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not runtime.started:
            await asyncio.to_thread(runtime.start)
        yield
        await asyncio.to_thread(runtime.stop)

    # No docs page: Swagger UI would fetch its assets from a CDN. /openapi.json stays.
    app = FastAPI(title="uda-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    install_error_boundary(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics,
                       is_published=lambda t: runtime.catalog is not None and runtime.catalog.get(t) is not None)
    cfg = config

    def task_known(request: Request, task: str):
        tv = runtime.require_task(task)
        request.state.uda_task = task  # a published name: safe as a metric label
        return tv

    def admin(request: Request) -> None:
        if admin_token is None:
            raise StarletteHTTPException(404, "admin routes are disabled: start uda-serve with "
                                              "--admin-token or UDA_ADMIN_TOKEN")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AdminAuthError(401, "admin routes need the header 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise AdminAuthError(403, "wrong admin token")

    # -- inference ---------------------------------------------------------------------------

    @app.post("/predict")
    async def predict(request: Request, task: str = Query(..., description="published task name"),
                      top_k: int = Query(5, ge=1, le=1000)):
        task_known(request, task)
        uploads = await read_images(request, cfg.max_batch, cfg.max_image_bytes)
        return predict_body(await runtime.infer(task, uploads), top_k)

    @app.post("/v2/models/{task}/infer")
    async def v2_infer(request: Request, task: str):
        task_known(request, task)
        uploads, body = await read_v2_images(request, cfg.max_batch, cfg.max_image_bytes)
        return v2_infer_body(await runtime.infer(task, uploads), body)

    # -- Open Inference Protocol v2 metadata and health ----------------------------------------

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        problems = runtime.readiness()
        if problems:
            return error_response(503, "not ready", "; ".join(problems))
        return {"ready": True}

    @app.get("/v2/models/{task}")
    async def v2_model(request: Request, task: str):
        return v2_model_body(task_known(request, task))

    @app.get("/v2/models/{task}/ready")
    async def v2_model_ready(request: Request, task: str):
        tv = task_known(request, task)
        return {"name": task, "ready": True, "resident": runtime.cache.peek(tv.key) is not None}

    # -- operations ------------------------------------------------------------------------------

    @app.get("/tasks")
    async def tasks():
        return {"tasks": runtime.task_entries()}

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive", **runtime.describe()}

    @app.get("/readyz")
    async def readyz():
        problems = runtime.readiness()
        if problems:
            return JSONResponse({"error": "not ready", "detail": "; ".join(problems),
                                 **runtime.describe()}, status_code=503)
        tasks = runtime.catalog.tasks()
        return {"status": "ready", "tasks": len(tasks),
                "problems": runtime.startup_problems, **runtime.describe()}

    @app.get("/metrics")
    async def metrics():
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)

    # -- admin -------------------------------------------------------------------------------------

    @app.post("/admin/tasks/{task}/load", dependencies=[Depends(admin)])
    async def admin_load(task: str):
        return await runtime.load(task)

    @app.post("/admin/tasks/{task}/unload", dependencies=[Depends(admin)])
    async def admin_unload(task: str):
        return runtime.unload(task)

    @app.post("/admin/reload", dependencies=[Depends(admin)])
    async def admin_reload():
        return await runtime.reload()

    @app.get("/admin/fingerprint", dependencies=[Depends(admin)])
    async def admin_fingerprint():
        """The base weights' sha256 now (any applied residual removed first) vs. at start."""
        now = await runtime.fingerprint_now()
        return {"fingerprint": now, "expected": runtime.engine.fingerprint,
                "unchanged": now == runtime.engine.fingerprint,
                "batches": runtime.worker.batches, "swaps": runtime.worker.swaps}

    return app
