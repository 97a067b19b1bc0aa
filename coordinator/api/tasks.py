"""Tasks (admin API): create, list, read, edit drafts, upload initial weights, lifecycle."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator import tasks as service
from fedge.coordinator.api.deps import (
    MAX_ID,
    AdminDep,
    BlobsDep,
    Pagination,
    RuntimeDep,
    SessionDep,
    SettingsDep,
    ViewerDep,
    page_of,
)
from fedge.coordinator.api.signals import kick_scheduler
from fedge.coordinator.auth import read_body
from fedge.coordinator.errors import NotFound, error_responses
from fedge.coordinator.models import Task
from fedge.coordinator.schemas.model_versions import ModelVersionPublic
from fedge.coordinator.schemas.tasks import TaskCreate, TaskPublic, TasksPublic, TaskUpdate
from fedge.coordinator.states import TaskStatus

router = APIRouter(prefix="/tasks", tags=["tasks"])
TaskId = Annotated[int, Path(ge=1, le=MAX_ID, description="Task id")]

BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A model in the binary wire format (docs/wire-format.md)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def get_task(session: Session, task_id: int, *, for_update: bool = False) -> Task:
    """The task, or 404. ``for_update`` locks its row (PostgreSQL) for a status change."""
    stmt = select(Task).where(Task.id == task_id)
    task = session.scalar(stmt.with_for_update() if for_update else stmt)
    if task is None:
        raise NotFound(f"no task {task_id}")
    return task


async def model_body(request: Request, settings: SettingsDep) -> bytes:
    """The request body, refused with 413 beyond ``max_model_bytes``."""
    return await read_body(request, limit=settings.max_model_bytes)


@router.post(
    "",
    status_code=201,
    response_model=TaskPublic,
    summary="Create a task (draft); built-in models get seeded initial weights",
    responses=error_responses(400, 401, 403, 422),
)
def create(
    body: TaskCreate,
    _caller: AdminDep,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
) -> TaskPublic:
    return service.to_public(service.create_task(session, blobs, settings, body), settings)


@router.get(
    "",
    response_model=TasksPublic,
    summary="List tasks (newest first), optionally by status",
    responses=error_responses(401, 422),
)
def list_tasks(
    _caller: ViewerDep,
    session: SessionDep,
    settings: SettingsDep,
    page: Pagination,
    status: Annotated[TaskStatus | None, Query(description="Only this status")] = None,
) -> TasksPublic:
    stmt = select(Task).order_by(Task.id.desc())
    if status is not None:
        stmt = stmt.where(Task.status == status)
    return page_of(TasksPublic, session, stmt, page, lambda t: service.to_public(t, settings))


@router.get(
    "/{task_id}",
    response_model=TaskPublic,
    summary="One task",
    responses=error_responses(401, 404, 422),
)
def read(
    task_id: TaskId, _caller: ViewerDep, session: SessionDep, settings: SettingsDep
) -> TaskPublic:
    return service.to_public(get_task(session, task_id), settings)


@router.patch(
    "/{task_id}",
    response_model=TaskPublic,
    summary="Change a draft task; a running or paused one accepts only training lr, epochs, "
    "batch_size and proximal_mu, applied from its next round (409 task_not_draft otherwise)",
    responses=error_responses(400, 401, 403, 404, 409, 422),
)
def update(
    task_id: TaskId,
    body: TaskUpdate,
    _caller: AdminDep,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
) -> TaskPublic:
    task = get_task(session, task_id, for_update=True)
    return service.to_public(service.update_task(session, blobs, settings, task, body), settings)


@router.put(
    "/{task_id}/model",
    response_model=ModelVersionPublic,
    summary="Upload a draft task's initial weights (binary wire model) as version 0",
    responses=error_responses(400, 401, 403, 404, 409, 413, 422),
    openapi_extra=BINARY_BODY,
)
def upload_model(
    task_id: TaskId,
    _caller: AdminDep,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    data: Annotated[bytes, Depends(model_body)],
) -> ModelVersionPublic:
    task = get_task(session, task_id, for_update=True)
    return service.version_to_public(
        service.upload_initial_model(session, blobs, settings, task, data)
    )


def _action(action: str, summary: str) -> None:
    @router.post(
        f"/{{task_id}}/{action}",
        response_model=TaskPublic,
        summary=summary,
        name=f"task_{action}",
        operation_id=f"task_{action}",
        responses=error_responses(401, 403, 404, 409, 422),
    )
    def handler(
        task_id: TaskId,
        _caller: AdminDep,
        session: SessionDep,
        runtime: RuntimeDep,
        settings: SettingsDep,
        background: BackgroundTasks,
    ) -> TaskPublic:
        task = get_task(session, task_id, for_update=True)
        warnings = service.config_warnings(task, settings)
        moved = service.transition(session, task, action, warnings=warnings)
        result = service.to_public(moved, settings)
        background.add_task(kick_scheduler, runtime)
        return result


_action("start", "Start a draft task (it needs initial weights)")
_action("pause", "Pause a running task (its devices stop working on it)")
_action("resume", "Resume a paused task")
_action("cancel", "Cancel a draft, running or paused task (final)")
