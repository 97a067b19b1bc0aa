"""Liveness and readiness probes (used by Docker's HEALTHCHECK and load balancers)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from coordinator.errors import NotReady, error_responses
from coordinator.migrate import schema_status

router = APIRouter(tags=["health"])


class Status(BaseModel):
    status: str


@router.get("/healthz", response_model=Status, summary="Liveness")
def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: database reachable and schema at head",
    responses=error_responses(503),
)
async def readyz(request: Request) -> Status:
    runtime = request.app.state.runtime
    ok, detail = await run_in_threadpool(schema_status, runtime.engine)
    if not ok:
        raise NotReady(detail)
    return Status(status="ready")
