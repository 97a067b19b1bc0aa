"""A device acts only on its own assignments."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.errors import Forbidden, NotFound
from fedge.coordinator.models import Assignment


def own_assignment(
    session: Session, *, device_id: str, assignment_id: int, for_update: bool = False
) -> Assignment:
    """The assignment, or 404 when there is none and 403 ``not_your_assignment`` when it
    belongs to another device.

    ``for_update`` locks the row for the transaction and reads its latest committed state
    (on PostgreSQL a concurrent writer of the row is waited for), for a caller that decides
    from the status what to write."""
    if for_update:
        a = session.scalar(
            select(Assignment)
            .where(Assignment.id == assignment_id)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        )
    else:
        a = session.get(Assignment, assignment_id)
    if a is None:
        raise NotFound(f"no assignment {assignment_id}")
    if a.device_id != device_id:
        raise Forbidden(
            f"assignment {assignment_id} belongs to another device", code="not_your_assignment"
        )
    return a
