"""Rounds (admin API, read-only): a task's rounds with counts and metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.api.declines import declines_page
from fedge.coordinator.api.deps import MAX_ID, Pagination, SessionDep, ViewerDep, page_of
from fedge.coordinator.api.tasks import TaskId, get_task
from fedge.coordinator.errors import NotFound, error_responses
from fedge.coordinator.models import Round
from fedge.coordinator.schemas.rounds import RoundPublic, RoundsPublic
from fedge.coordinator.schemas.targeting import DeclinesPublic
from fedge.coordinator.states import RoundStatus

router = APIRouter(prefix="/tasks/{task_id}/rounds", tags=["rounds"])
RoundNumber = Annotated[int, Path(ge=0, le=MAX_ID, description="Round number within the task")]


def to_public(rnd: Round) -> RoundPublic:
    return RoundPublic(
        id=rnd.id,
        task_id=rnd.task_id,
        number=rnd.number,
        base_version=rnd.base_version,
        status=rnd.status,
        status_reason=rnd.status_reason,
        target_updates=rnd.target_updates,
        result_version=rnd.result_version,
        opened_at=rnd.opened_at,
        deadline_at=rnd.deadline_at,
        closed_at=rnd.closed_at,
        num_assigned=rnd.num_assigned,
        num_received=rnd.num_received,
        num_stale=rnd.num_stale,
        num_dropped=rnd.num_dropped,
        num_rejected=rnd.num_rejected,
        num_declined=rnd.num_declined,
        num_clipped=rnd.num_clipped or 0,
        metrics=rnd.metrics or {},
    )


@router.get(
    "",
    response_model=RoundsPublic,
    summary="List a task's rounds (in order), optionally by status",
    responses=error_responses(401, 404, 422),
)
def list_rounds(
    task_id: TaskId,
    _caller: ViewerDep,
    session: SessionDep,
    page: Pagination,
    status: Annotated[RoundStatus | None, Query(description="Only this status")] = None,
) -> RoundsPublic:
    get_task(session, task_id)
    stmt = select(Round).where(Round.task_id == task_id).order_by(Round.number)
    if status is not None:
        stmt = stmt.where(Round.status == status)
    return page_of(RoundsPublic, session, stmt, page, to_public)


@router.get(
    "/{number}",
    response_model=RoundPublic,
    summary="One round of a task",
    responses=error_responses(401, 404, 422),
)
def read_round(
    task_id: TaskId, number: RoundNumber, _caller: ViewerDep, session: SessionDep
) -> RoundPublic:
    return to_public(_round(session, task_id, number))


def _round(session: Session, task_id: int, number: int) -> Round:
    get_task(session, task_id)
    rnd = session.scalar(select(Round).where(Round.task_id == task_id, Round.number == number))
    if rnd is None:
        raise NotFound(f"task {task_id} has no round {number}")
    return rnd


@router.get(
    "/{number}/declines",
    response_model=DeclinesPublic,
    summary="The assignments of a round that devices declined, newest first, with reasons",
    responses=error_responses(401, 404, 422),
)
def round_declines(
    task_id: TaskId, number: RoundNumber, _caller: ViewerDep, session: SessionDep, page: Pagination
) -> DeclinesPublic:
    return declines_page(session, page, round_id=_round(session, task_id, number).id)
