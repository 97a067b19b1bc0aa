"""What the dashboard shows, read from the database (so every coordinator process shows the
same): tasks, their recent rounds with bytes received, accuracy and loss over versions, the
devices by state, and recent events reconstructed from the rows' timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from fedge.coordinator.db import in_states
from fedge.coordinator.models import Assignment, Device, ModelVersion, Round, Task, Update
from fedge.coordinator.states import ASSIGNMENT_ACTIVE, AssignmentStatus, DeviceStatus

#: Tasks shown (the newest), rounds per task, versions per chart, devices, events.
MAX_TASKS = 20
MAX_ROUNDS = 25
MAX_VERSIONS = 500
MAX_DEVICES = 50
MAX_EVENTS = 40


@dataclass
class TaskView:
    id: int
    name: str
    status: str
    mode: str
    current_version: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    #: Metric name -> [(version, value)], for metrics whose name ends in accuracy or loss.
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Overview:
    now: datetime
    tasks: list[TaskView]
    devices: dict[str, int]
    device_rows: list[dict[str, Any]]
    events: list[dict[str, Any]]


def _series(session: Session, task_id: int) -> dict[str, list[tuple[int, float]]]:
    rows = session.execute(
        select(ModelVersion.version, ModelVersion.metrics)
        .where(ModelVersion.task_id == task_id)
        .order_by(ModelVersion.version.desc())
        .limit(MAX_VERSIONS)
    ).all()
    series: dict[str, list[tuple[int, float]]] = {}
    for version, metrics in reversed(rows):
        for name, value in sorted((metrics or {}).items()):
            if name.endswith(("accuracy", "loss")) and isinstance(value, int | float):
                series.setdefault(name, []).append((int(version), float(value)))
    return series


def _rounds(session: Session, task_id: int) -> list[dict[str, Any]]:
    rounds = session.scalars(
        select(Round)
        .where(Round.task_id == task_id)
        .order_by(Round.number.desc())
        .limit(MAX_ROUNDS)
    ).all()
    ids = [r.id for r in rounds]
    sizes = dict(
        session.execute(
            select(Update.round_id, func.sum(Update.byte_size))
            .where(Update.round_id.in_(ids))
            .group_by(Update.round_id)
        ).all()
    )
    return [
        {
            "number": r.number,
            "status": str(r.status),
            "base_version": r.base_version,
            "result_version": r.result_version,
            "assigned": r.num_assigned,
            "received": r.num_received,
            "dropped": r.num_dropped,
            "stale": r.num_stale,
            "bytes": int(sizes.get(r.id) or 0),
            "opened_at": r.opened_at,
            "closed_at": r.closed_at,
            "reason": r.status_reason or "",
        }
        for r in rounds
    ]


def _devices(
    session: Session, now: datetime, seen_window_s: float
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Counts by state and the most recently seen devices. ``online``: seen within the
    window; of those ``working`` (an assignment in progress) or ``idle``; ``failing``: active
    devices whose latest ended assignment was dropped (no update by its deadline)."""
    since = now - timedelta(seconds=seen_window_s)
    busy = (
        select(Assignment.device_id)
        .where(in_states(Assignment.status, ASSIGNMENT_ACTIVE))
        .distinct()
        .scalar_subquery()
    )
    latest = (
        select(Assignment.device_id, func.max(Assignment.id).label("last_id"))
        .where(Assignment.finished_at.is_not(None))
        .group_by(Assignment.device_id)
        .subquery()
    )
    failing_ids = set(
        session.scalars(
            select(Assignment.device_id)
            .join(latest, and_(Assignment.id == latest.c.last_id))
            .join(Device, Device.id == Assignment.device_id)
            .where(
                Assignment.status == AssignmentStatus.DROPPED,
                Device.status == DeviceStatus.ACTIVE,
            )
        )
    )
    active = Device.status == DeviceStatus.ACTIVE
    online = active & (Device.last_seen_at >= since)
    counts = {
        "enrolled": session.scalar(select(func.count()).select_from(Device).where(active)) or 0,
        "online": session.scalar(select(func.count()).select_from(Device).where(online)) or 0,
        "working": session.scalar(
            select(func.count()).select_from(Device).where(online, Device.id.in_(busy))
        )
        or 0,
        "failing": len(failing_ids),
        "revoked": session.scalar(
            select(func.count()).select_from(Device).where(Device.status == DeviceStatus.REVOKED)
        )
        or 0,
    }
    counts["idle"] = counts["online"] - counts["working"]
    working_ids = set(
        session.scalars(
            select(Assignment.device_id).where(in_states(Assignment.status, ASSIGNMENT_ACTIVE))
        )
    )
    rows = []
    for d in session.scalars(
        select(Device)
        .order_by(Device.last_seen_at.desc().nulls_last(), Device.id)
        .limit(MAX_DEVICES)
    ):
        if d.status == DeviceStatus.REVOKED:
            state = "revoked"
        elif d.id in failing_ids:
            state = "failing"
        elif d.last_seen_at is None or d.last_seen_at < since:
            state = "offline"
        else:
            state = "working" if d.id in working_ids else "idle"
        rows.append(
            {
                "id": d.id,
                "name": d.name,
                "state": state,
                "last_seen_at": d.last_seen_at,
                "completed": d.num_completed,
                "dropped": d.num_dropped,
            }
        )
    return counts, rows


def _events(session: Session) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for r in session.scalars(select(Round).order_by(Round.id.desc()).limit(MAX_EVENTS)):
        where = {"task": r.task_id, "round": r.number}
        events.append({"at": r.opened_at, "event": "round.opened", **where, "detail": ""})
        if r.closed_at is not None:
            closed = str(r.status) == "closed"
            events.append(
                {
                    "at": r.closed_at,
                    "event": "round.closed" if closed else "round.failed",
                    **where,
                    "detail": f"version {r.result_version}" if closed else r.status_reason or "",
                }
            )
    for t in session.scalars(
        select(Task)
        .where(Task.finished_at.is_not(None))
        .order_by(Task.finished_at.desc())
        .limit(10)
    ):
        events.append(
            {
                "at": t.finished_at,
                "event": f"task.{t.status}",
                "task": t.id,
                "round": None,
                "detail": t.status_reason or "",
            }
        )
    for u in session.scalars(
        select(Update).where(Update.status == "rejected").order_by(Update.id.desc()).limit(10)
    ):
        events.append(
            {
                "at": u.received_at,
                "event": "update.rejected",
                "task": u.task_id,
                "round": None,
                "detail": f"device {u.device_id}: {u.reason or ''}",
            }
        )
    events.sort(key=lambda e: e["at"], reverse=True)
    return events[:MAX_EVENTS]


def overview(session: Session, *, now: datetime, seen_window_s: float) -> Overview:
    tasks = []
    for t in session.scalars(select(Task).order_by(Task.id.desc()).limit(MAX_TASKS)):
        view = TaskView(
            id=t.id,
            name=t.name,
            status=str(t.status),
            mode=str((t.aggregation or {}).get("mode", "sync")),
            current_version=t.current_version,
        )
        view.rounds = _rounds(session, t.id)
        view.series = _series(session, t.id)
        tasks.append(view)
    counts, rows = _devices(session, now, seen_window_s)
    return Overview(now=now, tasks=tasks, devices=counts, device_rows=rows, events=_events(session))
