"""What the work long-poll (``GET /device/work``) answers; one short check per call.

- :func:`find_work`: the device's active assignment (``assigned``/``downloaded``), else, in a
  running async task whose concurrency cap allows it, a new assignment on the current version
  (a device works at most once per async round, i.e. per model version).
- :func:`require_active`: a device revoked while it waited is refused (403 ``device_revoked``)
  as soon as its poll wakes; a poll on its current assignment first reports the cancellation
  that the revocation caused.
- :func:`cancellation`: whether the assignment the device is working on was stopped
  (``cancelled``: its round closed early, the task was paused, cancelled or completed;
  ``dropped``: its round's deadline passed). Both are answered as ``status: cancelled`` so
  the device stops training at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.engine import rounds
from coordinator.engine.config import AggregationConfig, ConfigError
from coordinator.engine.ownership import own_assignment
from coordinator.errors import Forbidden
from coordinator.models import ASSIGNMENT_ACTIVE, Assignment, Device, Task

API = "/api/v1"


def assignment_payload(a: Assignment, task: Task, *, mode: str) -> dict[str, Any]:
    """The JSON body describing one assignment (docs/protocol.md, "Work long-poll")."""
    return {
        "assignment_id": a.id,
        "status": a.status,
        "task_id": task.id,
        "round_id": a.round_id,
        "mode": mode,
        "base_version": a.base_version,
        "deadline": a.lease_expires_at,
        "model_url": f"{API}/device/tasks/{task.id}/models/{a.base_version}",
        "upload_url": f"{API}/device/assignments/{a.id}/update",
        "compression": task.compression,
        "training": task.training,
        "model": task.model_config_,
        "spec": task.model_spec,
    }


def _mode(task: Task) -> str:
    mode = (task.aggregation or {}).get("mode", "sync")
    return mode if mode in ("sync", "async") else "sync"


def find_work(session: Session, *, device_id: str, now: datetime) -> dict[str, Any] | None:
    """The assignment the device should work on now, or ``None``."""
    active = session.scalar(
        select(Assignment)
        .where(Assignment.device_id == device_id, Assignment.status.in_(ASSIGNMENT_ACTIVE))
        .order_by(Assignment.id.desc())
        .limit(1)
    )
    if active is not None:
        task = session.get(Task, active.task_id)
        assert task is not None
        return assignment_payload(active, task, mode=_mode(task))
    async_tasks = session.scalars(
        select(Task).where(Task.status == "running").order_by(Task.id)
    ).all()
    for candidate in async_tasks:
        if _mode(candidate) != "async":
            continue
        # Serialize with the scheduler and other requests for this task (concurrency cap).
        task = session.scalar(
            select(Task)
            .where(Task.id == candidate.id, Task.status == "running")
            .with_for_update(key_share=True)
        )
        if task is None:
            continue
        try:
            cfg = AggregationConfig.from_dict(task.aggregation)
        except ConfigError:
            continue
        rnd = rounds.active_round(session, task.id)
        if rnd is None or rnd.status != "open" or rnd.base_version != task.current_version:
            continue
        a = rounds.assign_async(session, task, rnd, device_id, cfg, now=now)
        if a is not None:
            return assignment_payload(a, task, mode="async")
    return None


def require_active(session: Session, device_id: str) -> None:
    """A device revoked while its long-poll waited gets no more work (403 at once)."""
    device = session.get(Device, device_id)
    if device is None or device.status != "active":
        raise Forbidden(f"device {device_id} has been revoked", code="device_revoked")


def cancellation(session: Session, *, device_id: str, assignment_id: int) -> dict[str, Any] | None:
    """A ``status: cancelled`` body when the device's assignment was stopped, else ``None``."""
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id)
    if a.status not in ("cancelled", "dropped"):
        return None
    return {
        "assignment_id": a.id,
        "status": "cancelled",
        "reason": "deadline passed" if a.status == "dropped" else "stopped by the coordinator",
        "task_id": a.task_id,
        "round_id": a.round_id,
        "base_version": a.base_version,
    }
