"""A read-only look that tells when a running async task's scheduler step would change
nothing, so the step can skip its write transaction.

The scheduler steps every running task each tick (``scheduler_interval_s``). For an async task
the step (:meth:`fedge.coordinator.engine.scheduler.TaskStepper._async_transitions`) locks the
task row, drops assignments whose lease ran out, cancels assignments on a version more than
``max_staleness`` behind, opens a round when none is active, says in ``status_reason`` why no
work goes out when nobody works, and keeps the round's ``num_received`` equal to the pending
updates (at most ``buffer_size``); it aggregates when ``buffer_size`` updates wait. Between
aggregations most steps find all of that in order and commit nothing, yet each one costs a
dozen ORM statements. :func:`idle_async_step` reads what those decisions depend on in one
SQLAlchemy Core statement (no lock, no write) and takes the step's place only when every one
of them would leave the database as it is, but for the round's counter:

- the task is running, its configuration is usable and async, and it has versions left;
- no active assignment's lease has run out (at ``now``) and none is on a version below
  ``current_version - max_staleness``;
- a round is active and fewer than ``buffer_size`` updates are pending (its ``num_received``
  is then set to their number, one ``UPDATE`` of that round row while it is still active,
  when it differs);
- some device is at work and ``status_reason`` is empty (otherwise the step may have to say
  or unsay why nobody works, which takes its eligibility query).

Anything else (or a change that lands just after the look) is left to the full step, as a
change just after that step's commit would be: the next tick or an upload's kick runs it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, select, update

from fedge.coordinator.db import READ_ONLY, in_states, write_connection
from fedge.coordinator.models import Assignment, Round, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ROUND_ACTIVE,
    TaskStatus,
    UpdateStatus,
)

_NOW = bindparam("p_now", type_=Assignment.__table__.c.lease_expires_at.type)
_ACTIVE_WORK = (Assignment.task_id == Task.id, in_states(Assignment.status, ASSIGNMENT_ACTIVE))


def _active_round(column: Any) -> Any:
    return (
        select(column)
        .where(Round.task_id == Task.id, in_states(Round.status, ROUND_ACTIVE))
        .order_by(Round.number.desc())
        .limit(1)
        .scalar_subquery()
    )


_LOOK = select(
    Task.status,
    Task.current_version,
    Task.updated_at,
    Task.status_reason,
    select(func.min(Assignment.base_version)).where(*_ACTIVE_WORK).scalar_subquery(),
    exists()
    .where(
        *_ACTIVE_WORK,
        Assignment.lease_expires_at.is_not(None),
        Assignment.lease_expires_at < _NOW,
    )
    .label("expired"),
    _active_round(Round.id),
    _active_round(Round.num_received),
    select(func.count(Update.id))
    .where(Update.task_id == Task.id, Update.status == UpdateStatus.ACCEPTED)
    .scalar_subquery(),
).where(Task.id == bindparam("p_task"))


_COUNT_RECEIVED = (
    update(Round)
    .where(Round.id == bindparam("p_round"), in_states(Round.status, ROUND_ACTIVE))
    .values(num_received=bindparam("p_received"))
)


def idle_async_step(runtime: Runtime, task_id: int, *, now: datetime) -> bool:
    """The step of ``task_id`` at ``now`` when it is idle (see the module docstring): True
    when it was done here, with at most the round's ``num_received`` written (one statement
    on the round row, taking no other lock); False when the full step must run."""
    with runtime.engine.connect() as conn:
        conn = conn.execution_options(**READ_ONLY)
        try:
            row = conn.execute(_LOOK, {"p_task": task_id, "p_now": now}).first()
            if row is None:
                return False
            status, current, updated_at, reason, min_base, expired = row[:6]
            round_id, received, pending = row[6:]
            if status != TaskStatus.RUNNING or reason is not None:
                return False
            try:
                parsed = runtime.task_configs.lookup(conn, task_id, updated_at)
            except LookupError:
                return False
        finally:
            conn.rollback()
    cfg = parsed.config
    if cfg is None or cfg.mode != "async" or not 0 <= current < cfg.num_rounds:
        return False
    if min_base is None or expired or min_base < current - cfg.max_staleness:
        return False
    if round_id is None or int(pending) >= cfg.buffer_size:
        return False
    if received != pending:
        with write_connection(runtime.engine) as conn:
            conn.execute(_COUNT_RECEIVED, {"p_round": round_id, "p_received": int(pending)})
    return True
