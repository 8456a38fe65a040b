"""The two pages a person opens in a browser: `/docs` (Swagger UI) and `/ui` (the playground).

Both are served from the package itself, so they load with no request leaving the machine:
Swagger UI's assets come from the `swagger-ui-bundle-v2` wheel, the playground is plain HTML,
CSS and JavaScript in server/ui/ (no build step).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).with_name("ui")
_SWAGGER_ASSETS = "/docs/assets"


def install_pages(app: FastAPI, docs: bool = True) -> None:
    """`/ui` always; `/docs` unless `docs` is False (`uda-serve --no-docs`)."""

    @app.get("/ui", include_in_schema=False)
    async def playground():
        return FileResponse(UI_DIR / "index.html")

    app.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")
    if docs:
        _install_docs(app)


def _install_docs(app: FastAPI) -> None:
    from swagger_ui_bundle import swagger_ui_path

    app.mount(_SWAGGER_ASSETS, StaticFiles(directory=swagger_ui_path), name="swagger-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title}: API",
            swagger_js_url=f"{_SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_SWAGGER_ASSETS}/favicon-32x32.png",
            # null: no badge from swagger.io's online validator
            swagger_ui_parameters={"validatorUrl": None})
