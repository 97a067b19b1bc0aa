"""HTTP routers. One router per resource; ``build_router`` assembles them.

Health probes live at the root; everything else is under ``/api/v1``.
"""

from __future__ import annotations

from fastapi import APIRouter

from fedge.coordinator.api import (
    device,
    device_work,
    devices,
    health,
    keys,
    model_versions,
    rounds,
    tasks,
    tokens,
)
from fedge.coordinator.paths import API_PREFIX


def build_router() -> APIRouter:
    router = APIRouter()
    router.include_router(health.router)
    api = APIRouter(prefix=API_PREFIX)
    for module in (tasks, rounds, model_versions, devices, tokens, keys, device, device_work):
        api.include_router(module.router)
    router.include_router(api)
    return router
