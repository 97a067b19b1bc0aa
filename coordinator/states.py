"""The states a task, round, device, assignment and update can be in.

Each enum's values are the strings stored in the ``status`` columns and sent in the API, so a
member compares and serializes exactly like the string it replaces. The database refuses any
other value (a CHECK constraint per column, migration 0003), and so does the ORM before the
statement is sent (:class:`fedge.coordinator.db.StatusType`).

The groups below (which states still have work in them, which are final) are defined here
once; every query and check uses them.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class RoundStatus(StrEnum):
    OPEN = "open"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class AssignmentStatus(StrEnum):
    ASSIGNED = "assigned"
    DOWNLOADED = "downloaded"
    UPLOADED = "uploaded"
    DROPPED = "dropped"
    CANCELLED = "cancelled"


class UpdateStatus(StrEnum):
    ACCEPTED = "accepted"
    APPLIED = "applied"
    REJECTED = "rejected"


#: Tasks the scheduler drives (running) or keeps (paused: rounds wait, aggregation finishes).
TASK_LIVE: tuple[TaskStatus, ...] = (TaskStatus.RUNNING, TaskStatus.PAUSED)
#: Tasks that never change state again.
TASK_TERMINAL: tuple[TaskStatus, ...] = (
    TaskStatus.COMPLETED,
    TaskStatus.CANCELLED,
    TaskStatus.FAILED,
)
#: Rounds not yet closed or failed: at most one per task.
ROUND_ACTIVE: tuple[RoundStatus, ...] = (RoundStatus.OPEN, RoundStatus.AGGREGATING)
#: Assignments a device is still working on.
ASSIGNMENT_ACTIVE: tuple[AssignmentStatus, ...] = (
    AssignmentStatus.ASSIGNED,
    AssignmentStatus.DOWNLOADED,
)
#: Assignments ended by the coordinator rather than by an upload.
ASSIGNMENT_ENDED: tuple[AssignmentStatus, ...] = (
    AssignmentStatus.CANCELLED,
    AssignmentStatus.DROPPED,
)
#: Updates whose examples count toward the task (waiting for or already in a version).
UPDATE_COUNTED: tuple[UpdateStatus, ...] = (UpdateStatus.ACCEPTED, UpdateStatus.APPLIED)
