"""Rounds of a task, with their counts and metrics (written by the round engine)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from fedge.coordinator.schemas.common import Page
from fedge.coordinator.states import RoundStatus


class RoundPublic(BaseModel):
    id: int
    task_id: int
    number: int
    base_version: int
    status: RoundStatus
    status_reason: str | None
    target_updates: int
    result_version: int | None
    opened_at: datetime
    deadline_at: datetime | None
    closed_at: datetime | None
    num_assigned: int
    num_received: int
    num_stale: int
    num_dropped: int
    num_rejected: int
    num_declined: int
    #: Applied updates the task's L2 norm bound scaled down.
    num_clipped: int = 0
    metrics: dict[str, Any]


class RoundsPublic(Page[RoundPublic]):
    pass
