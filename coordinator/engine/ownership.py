"""A device acts only on its own assignments."""

from __future__ import annotations

from sqlalchemy.orm import Session

from coordinator.errors import Forbidden, NotFound
from coordinator.models import Assignment


def own_assignment(session: Session, *, device_id: str, assignment_id: int) -> Assignment:
    """The assignment, or 404 when there is none and 403 ``not_your_assignment`` when it
    belongs to another device."""
    a = session.get(Assignment, assignment_id)
    if a is None:
        raise NotFound(f"no assignment {assignment_id}")
    if a.device_id != device_id:
        raise Forbidden(
            f"assignment {assignment_id} belongs to another device", code="not_your_assignment"
        )
    return a
