"""The FastAPI application: the runtime's lifespan, middleware, error boundary and the routers
of server/routes.py. Work happens in runtime.py, errors in http_errors.py."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from fastapi import FastAPI

from server.config import ADMIN_TOKEN_ENV, ServeConfig
from server.http_errors import install_error_boundary
from server.pages import install_pages
from server.request_metrics import RequestMetricsMiddleware
from server.routes import ROUTERS
from server.runtime import ServeRuntime

logger = logging.getLogger(__name__)


def create_app(config: ServeConfig, runtime: ServeRuntime | None = None) -> FastAPI:
    """The app for `config`; builds the runtime at startup unless given a started one."""
    runtime = runtime or ServeRuntime(config)
    admin_token = config.resolved_admin_token()
    raw_token = config.admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    if admin_token is not None and raw_token != admin_token:
        logger.warning("the admin token has whitespace around it (a file's trailing newline?); "
                       "it was removed: clients send the token without it")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not runtime.started:
            await asyncio.to_thread(runtime.start)
        yield
        await asyncio.to_thread(runtime.stop)

    # /docs is installed by install_pages, with Swagger UI's assets from a wheel instead of a CDN.
    # No slash redirects: an API answers the path it was asked (a 307 to a guessed path only
    # confuses clients and fuzzers).
    app = FastAPI(title="uda-serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False)
    app.state.runtime = runtime
    install_error_boundary(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics,
                       is_published=runtime.is_published)
    app.state.config = config
    app.state.admin_token = admin_token
    for router in ROUTERS:
        # The routes themselves rather than include_router: FastAPI 0.165 keeps an included
        # router as one opaque node, and app.routes must list every path (tests/ops reads it).
        # Each APIRoute already carries its router's dependencies.
        app.router.routes.extend(router.routes)
    install_pages(app, docs=config.docs)
    return app
