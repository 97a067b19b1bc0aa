"""Declines as the admin API lists them, per device (``/devices/{id}/declines``) and per
round (``/tasks/{task_id}/rounds/{number}/declines``), newest first."""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from fedge.coordinator.api.deps import Page
from fedge.coordinator.models import Assignment, Round
from fedge.coordinator.schemas.targeting import DeclinePublic, DeclinesPublic


def declines_page(
    session: Session, page: Page, *, device_id: str | None = None, round_id: int | None = None
) -> DeclinesPublic:
    where: list[ColumnElement[bool]] = [Assignment.decline_reason.is_not(None)]
    if device_id is not None:
        where.append(Assignment.device_id == device_id)
    if round_id is not None:
        where.append(Assignment.round_id == round_id)
    total = session.scalar(select(func.count(Assignment.id)).where(*where))
    rows = session.execute(
        select(Assignment, Round.number)
        .join(Round, Round.id == Assignment.round_id)
        .where(*where)
        .order_by(Assignment.id.desc())
        .limit(page.limit)
        .offset(page.offset)
    ).all()
    return DeclinesPublic(
        items=[
            DeclinePublic(
                assignment_id=a.id,
                device_id=a.device_id,
                task_id=a.task_id,
                round_id=a.round_id,
                round_number=number,
                reason=a.decline_reason or "",
                detail=a.decline_detail or "",
                declined_at=a.finished_at,
            )
            for a, number in rows
        ],
        total=int(total or 0),
        limit=page.limit,
        offset=page.offset,
    )
