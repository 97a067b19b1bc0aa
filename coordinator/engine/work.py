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
- :func:`check_waiting`: the same questions for many waiting long-polls in a few queries
  (the re-checks and wake-ups of idle devices); a poll is only answered from it when the
  answer is its active assignment, anything else goes back to the poll's own check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.ownership import own_assignment
from fedge.coordinator.errors import Forbidden
from fedge.coordinator.models import Assignment, Device, Task
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ASSIGNMENT_ENDED,
    AssignmentStatus,
    DeviceStatus,
    RoundStatus,
    TaskStatus,
)

#: The parts of a work answer a device can keep between assignments of one task.
TASK_CONFIG_KEYS = ("compression", "training", "model", "spec")


def config_digest(task: Task) -> str:
    """A short digest of the task's :data:`TASK_CONFIG_KEYS` (what ``known`` refers to)."""
    canonical = json.dumps(
        [task.compression, task.training, task.model_config_, task.model_spec],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def without_known_config(payload: dict[str, Any], known: str | None) -> dict[str, Any]:
    """``payload`` without the task configuration when the device already holds it."""
    if known is None or payload.get("config_digest") != known:
        return payload
    return {k: v for k, v in payload.items() if k not in TASK_CONFIG_KEYS}


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
        "model_url": f"{DEVICE_PREFIX}/tasks/{task.id}/models/{a.base_version}",
        "upload_url": f"{DEVICE_PREFIX}/assignments/{a.id}/update",
        "config_digest": config_digest(task),
        "compression": task.compression,
        "training": task.training,
        "model": task.model_config_,
        "spec": task.model_spec,
    }


def _mode(task: Task) -> str:
    return _mode_of(task.aggregation)


def _mode_of(aggregation: Any) -> str:
    mode = (aggregation or {}).get("mode", "sync") if isinstance(aggregation, dict) else "sync"
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
    # Only the ids and modes of the running tasks: the full row is loaded (and locked) for
    # the async ones alone.
    candidates = session.execute(
        select(Task.id, Task.aggregation).where(Task.status == TaskStatus.RUNNING).order_by(Task.id)
    ).all()
    for candidate_id, aggregation in candidates:
        if _mode_of(aggregation) != "async":
            continue
        # Serialize with the scheduler and other requests for this task (concurrency cap).
        task = session.scalar(
            select(Task)
            .where(Task.id == candidate_id, Task.status == TaskStatus.RUNNING)
            .with_for_update(key_share=True)
        )
        if task is None:
            continue
        try:
            cfg = AggregationConfig.from_dict(task.aggregation)
        except ConfigError:
            continue
        rnd = rounds.active_round(session, task.id)
        if (
            rnd is None
            or rnd.status != RoundStatus.OPEN
            or rnd.base_version != task.current_version
        ):
            continue
        a = rounds.assign_async(session, task, rnd, device_id, cfg, now=now)
        if a is not None:
            return assignment_payload(a, task, mode="async")
    return None


def require_active(session: Session, device_id: str) -> None:
    """A device revoked while its long-poll waited gets no more work (403 at once)."""
    device = session.get(Device, device_id)
    if device is None or device.status != DeviceStatus.ACTIVE:
        raise Forbidden(f"device {device_id} has been revoked", code="device_revoked")


def cancellation(session: Session, *, device_id: str, assignment_id: int) -> dict[str, Any] | None:
    """A ``status: cancelled`` body when the device's assignment was stopped, else ``None``."""
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id)
    if a.status not in ASSIGNMENT_ENDED:
        return None
    return {
        "assignment_id": a.id,
        "status": AssignmentStatus.CANCELLED,
        "reason": "deadline passed"
        if a.status == AssignmentStatus.DROPPED
        else "stopped by the coordinator",
        "task_id": a.task_id,
        "round_id": a.round_id,
        "base_version": a.base_version,
    }


#: What :func:`check_waiting` says about one waiting poll: ``found`` (the payload is the
#: answer), ``none`` (nothing new: keep waiting) or ``check`` (run the poll's own check).
Verdict = tuple[Literal["found", "none", "check"], dict[str, Any] | None]
#: Ids per ``IN (...)`` list of :func:`check_waiting`.
CHECK_CHUNK = 500


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + CHECK_CHUNK] for i in range(0, len(items), CHECK_CHUNK)]


def _async_work_rounds(session: Session) -> list[int]:
    """Open rounds of running async tasks that may hand out an assignment now (as
    :func:`find_work` sees them: a task whose configuration cannot be read hands out none)."""
    open_rounds: list[int] = []
    for task_id, aggregation, version in session.execute(
        select(Task.id, Task.aggregation, Task.current_version).where(
            Task.status == TaskStatus.RUNNING
        )
    ):
        if _mode_of(aggregation) != "async":
            continue
        try:
            cfg = AggregationConfig.from_dict(aggregation)
        except ConfigError:
            continue
        rnd = rounds.active_round(session, task_id)
        if rnd is None or rnd.status != RoundStatus.OPEN or rnd.base_version != version:
            continue
        active = session.scalar(
            select(func.count(Assignment.id)).where(
                Assignment.task_id == task_id, Assignment.status.in_(ASSIGNMENT_ACTIVE)
            )
        )
        if int(active or 0) < cfg.max_concurrency:
            open_rounds.append(rnd.id)
    return open_rounds


def check_waiting(session: Session, polls: Sequence[tuple[str, int | None]]) -> list[Verdict]:
    """One verdict per waiting poll ``(device_id, current)``, in order, from a few queries.

    ``found`` is given only for a poll without ``current`` of an active device that has an
    active assignment: exactly what :func:`find_work` would answer. ``check`` whenever the
    poll's own check may answer something else (revoked or unknown device, its current
    assignment stopped or not its own, async work possibly available to it); ``none`` when
    it would answer nothing.
    """
    device_ids = sorted({d for d, _ in polls})
    status: dict[str, DeviceStatus] = {}
    for part in _chunks(device_ids):
        rows = session.execute(select(Device.id, Device.status).where(Device.id.in_(part)))
        status.update({device_id: st for device_id, st in rows})  # not a Result: it has keys()
    currents = sorted({c for _, c in polls if c is not None})
    owners: dict[int, tuple[str, AssignmentStatus]] = {}
    for part in _chunks(currents):
        for aid, owner_id, st in session.execute(
            select(Assignment.id, Assignment.device_id, Assignment.status).where(
                Assignment.id.in_(part)
            )
        ):
            owners[aid] = (owner_id, st)
    idle = sorted({d for d, c in polls if c is None and status.get(d) == DeviceStatus.ACTIVE})
    latest: dict[str, Assignment] = {}
    for part in _chunks(idle):
        for a in session.scalars(
            select(Assignment)
            .where(Assignment.device_id.in_(part), Assignment.status.in_(ASSIGNMENT_ACTIVE))
            .order_by(Assignment.id.desc())
        ):
            latest.setdefault(a.device_id, a)
    tasks = (
        {
            t.id: t
            for t in session.scalars(
                select(Task).where(Task.id.in_({a.task_id for a in latest.values()}))
            )
        }
        if latest
        else {}
    )
    waiting = [d for d in idle if d not in latest]
    may_get_work: set[str] = set()
    if waiting:
        open_rounds = _async_work_rounds(session)
        if open_rounds:
            done: dict[int, set[str]] = {r: set() for r in open_rounds}
            for part in _chunks(waiting):
                for rid, did in session.execute(
                    select(Assignment.round_id, Assignment.device_id).where(
                        Assignment.round_id.in_(open_rounds), Assignment.device_id.in_(part)
                    )
                ):
                    done[rid].add(did)
            may_get_work = {d for d in waiting if any(d not in done[r] for r in open_rounds)}
    verdicts: list[Verdict] = []
    for device_id, current in polls:
        if status.get(device_id) != DeviceStatus.ACTIVE:
            verdicts.append(("check", None))
        elif current is not None:
            owner = owners.get(current)
            stopped = owner is None or owner[0] != device_id or owner[1] in ASSIGNMENT_ENDED
            verdicts.append(("check", None) if stopped else ("none", None))
        elif device_id in latest:
            a = latest[device_id]
            task = tasks.get(a.task_id)
            if task is None:
                verdicts.append(("check", None))
            else:
                verdicts.append(("found", assignment_payload(a, task, mode=_mode(task))))
        elif device_id in may_get_work:
            verdicts.append(("check", None))
        else:
            verdicts.append(("none", None))
    return verdicts
