"""A device declining an assignment it cannot work on (``POST /device/assignments/{id}/
decline``, docs/protocol.md "Decline").

The assignment ends at once (``cancelled``, with the reason kept on it), so a sync round
replaces the device instead of waiting for its deadline
(:func:`fedge.coordinator.engine.rounds.settle_declines`) and an async task's concurrency slot
is free again. A decline does not count against the device's reliability (it is not a
drop); it counts in ``Device.num_declined`` and ``Round.num_declined``. Until the device
reports its capabilities again it is not offered that task any more (it would only decline
again).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.updates import lock_for_upload
from fedge.coordinator.errors import Conflict
from fedge.coordinator.models import Device, Round
from fedge.coordinator.states import ASSIGNMENT_ACTIVE, AssignmentStatus


@dataclass(frozen=True)
class Declined:
    assignment_id: int
    task_id: int
    round_id: int
    round_number: int
    reason: str
    detail: str
    declined_at: datetime | None
    duplicate: bool


def decline_assignment(
    session: Session,
    *,
    device_id: str,
    assignment_id: int,
    reason: str,
    detail: str,
    now: datetime,
) -> Declined:
    """End the device's active assignment as declined (in the caller's transaction).

    404 / 403 ``not_your_assignment`` as any assignment request; 409 ``assignment_ended``
    when it already ended otherwise (uploaded or dropped). An assignment the coordinator
    cancelled while the device was finding out that it cannot do it (its round reached its
    target meanwhile) is declined all the same: it stays cancelled, and the decline is kept
    and counted, so the device is not offered the task again. Declining again answers the
    first decline (``duplicate``) and changes nothing."""
    a, _ = lock_for_upload(session, device_id=device_id, assignment_id=assignment_id)
    number = int(session.scalar(select(Round.number).where(Round.id == a.round_id)) or 0)
    if a.decline_reason is not None:
        return Declined(
            a.id,
            a.task_id,
            a.round_id,
            number,
            a.decline_reason,
            a.decline_detail or "",
            a.finished_at,
            duplicate=True,
        )
    cancelled = a.status == AssignmentStatus.CANCELLED
    if a.status not in ASSIGNMENT_ACTIVE and not cancelled:
        raise Conflict(
            f"assignment {assignment_id} is {a.status}; only work in progress (or work the "
            "coordinator cancelled) can be declined",
            code="assignment_ended",
        )
    if not cancelled:
        a.status = AssignmentStatus.CANCELLED
        a.finished_at = now
    a.decline_reason = reason
    a.decline_detail = detail
    session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(num_declined=Device.num_declined + 1)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    rounds.bump_round(session, a.round_id, num_declined=1)
    return Declined(
        a.id, a.task_id, a.round_id, number, reason, detail, a.finished_at, duplicate=False
    )
