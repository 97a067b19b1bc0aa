"""HTTP routers. One router per resource; ``include_routers`` adds them to the app.

Health probes and ``/metrics`` live at the root; everything else is under ``/api/v1``.
"""

from __future__ import annotations

from fastapi import FastAPI

from fedge.coordinator.api import (
    device,
    device_work,
    devices,
    health,
    keys,
    metrics,
    model_versions,
    rounds,
    secagg,
    tasks,
    tokens,
)
from fedge.coordinator.paths import API_PREFIX


def include_routers(app: FastAPI) -> None:
    """Every resource's router, included in ``app`` directly (one level: FastAPI matches a
    request against every router nested above its route, so nesting costs each request)."""
    app.include_router(health.router)
    app.include_router(metrics.router)
    for module in (
        tasks,
        rounds,
        model_versions,
        devices,
        tokens,
        keys,
        device,
        device_work,
        secagg,
    ):
        app.include_router(module.router, prefix=API_PREFIX)
