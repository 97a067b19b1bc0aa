"""HTTP routers. One router per resource; ``build_router`` assembles them."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.api import health


def build_router() -> APIRouter:
    router = APIRouter()
    router.include_router(health.router)
    return router
