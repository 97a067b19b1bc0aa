"""Liveness and readiness probes (used by Docker's HEALTHCHECK and load balancers)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import select

from fedge.coordinator.db import in_states
from fedge.coordinator.errors import NotReady, error_responses
from fedge.coordinator.migrate import schema_status
from fedge.coordinator.models import ModelVersion, Task
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.states import TASK_LIVE

router = APIRouter(tags=["health"])


class Status(BaseModel):
    status: str


@router.get("/healthz", response_model=Status, summary="Liveness")
def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: database at head, blob store usable, current models present",
    responses=error_responses(503),
)
async def readyz(request: Request) -> Status:
    runtime: Runtime = request.app.state.runtime
    ok, detail = await run_in_threadpool(schema_status, runtime.engine)
    if ok:
        ok, detail = await run_in_threadpool(_blobs_status, runtime)
    if not ok:
        raise NotReady(detail)
    return Status(status="ready")


def _blobs_status(runtime: Runtime) -> tuple[bool, str]:
    """The blob store is usable and holds the current model of every live task (a restore
    that forgot the blob directory is not ready)."""
    ok, detail = runtime.blobs.check()
    if not ok:
        return ok, detail
    with runtime.sessions() as session:
        digests = session.scalars(
            select(ModelVersion.blob_digest)
            .join(Task, Task.id == ModelVersion.task_id)
            .where(
                in_states(Task.status, TASK_LIVE),
                ModelVersion.version == Task.current_version,
            )
        ).all()
    missing = [d for d in digests if not runtime.blobs.exists(d)]
    if missing:
        return False, f"{len(missing)} current model blob(s) missing, e.g. {missing[0]}"
    return True, "ready"
