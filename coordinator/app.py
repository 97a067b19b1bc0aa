"""The application factory. Nothing is built at import time: tests and the CLI call
``create_app(settings)`` with their own settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from fedge.coordinator import __version__
from fedge.coordinator.api import include_routers
from fedge.coordinator.api.bodylimit import BodyLimitMiddleware
from fedge.coordinator.api.overload import OverloadMiddleware
from fedge.coordinator.engine.lifecycle import start_engine, stop_engine
from fedge.coordinator.errors import install_error_handlers
from fedge.coordinator.gcjob import start_gc_job
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # More threads than requests in flight (see fedge.coordinator.api.overload).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
        runtime = Runtime.open(settings)
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
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(
        OverloadMiddleware,
        max_in_flight=settings.max_connections,
        device_limit=settings.device_connections,  # the rest is kept for probes and admins
        device_prefix=DEVICE_PREFIX + "/",
    )
    include_routers(app)
    return app
