"""The application factory. Nothing is built at import time: tests and the CLI call
``create_app(settings)`` with their own settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from fedge.coordinator import __version__
from fedge.coordinator.api import include_routers
from fedge.coordinator.api.bodylimit import BodyLimitMiddleware
from fedge.coordinator.api.overload import OverloadMiddleware
from fedge.coordinator.api.upload_route import install_upload_route
from fedge.coordinator.api.work_route import install_work_route
from fedge.coordinator.dashboard import install_dashboard
from fedge.coordinator.engine.lifecycle import start_engine, stop_engine
from fedge.coordinator.errors import UnhandledErrorMiddleware, install_error_handlers
from fedge.coordinator.gcjob import start_gc_job
from fedge.coordinator.metrics import Metrics, MetricsMiddleware, RouteTable
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings

log = logging.getLogger(__name__)

#: Files the coordinator serves at /static: the dashboard's script and style, Swagger UI.
STATIC_DIR = Path(__file__).parent / "static"
SWAGGER = "/static/swagger-ui"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics() if settings.metrics_enabled else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # More threads than requests in flight (see fedge.coordinator.api.overload).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
        runtime = Runtime.open(settings)
        if metrics is not None:
            runtime.metrics = metrics
            runtime.event_hooks.append(metrics.on_event)
        app.state.runtime = runtime
        try:
            await start_engine(runtime)
            try:
                # Garbage collection of blobs: a job of its own, apart from the round engine.
                gc_job = start_gc_job(runtime)
                app.state.gc_job = gc_job
                try:
                    yield
                finally:
                    if gc_job is not None:
                        await gc_job.stop()
            finally:
                await stop_engine(runtime)
        finally:
            runtime.close()

    app = FastAPI(
        title="fedge coordinator",
        version=__version__,
        description="Federated edge learning: tasks, rounds, devices and model updates.",
        lifespan=lifespan,
        # /docs is served below from vendored Swagger UI files, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(
        OverloadMiddleware,
        max_in_flight=settings.max_connections,
        device_limit=settings.device_connections,  # the rest is kept for probes and admins
        device_prefix=DEVICE_PREFIX + "/",
    )
    # Inside the metrics: an unexpected error is counted as the 500 it is answered with.
    app.add_middleware(UnhandledErrorMiddleware)
    # Outermost: it sees the other middleware's refusals too (and logs refused uploads).
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=RouteTable(app))
    include_routers(app)
    # The hot device routes' well-formed requests, before their FastAPI routes.
    install_work_route(app)
    install_upload_route(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_docs(app)
    install_dashboard(app)
    return app


def install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the files vendored under ``static/swagger-ui`` (so it works
    without Internet access) on the app's ``/openapi.json``."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        )
