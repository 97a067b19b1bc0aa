"""Bodies of the device's work cycle (docs/protocol.md): the work long-poll's answers, the
upload's answer and a separate metrics report."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from coordinator.schemas.common import Strict
from coordinator.states import AssignmentStatus, UpdateStatus


class WorkAssignment(BaseModel):
    assignment_id: int
    status: AssignmentStatus
    task_id: int
    round_id: int
    mode: Literal["sync", "async"]
    base_version: int
    deadline: datetime | None = Field(description="When the assignment's lease ends")
    model_url: str
    upload_url: str
    compression: dict[str, Any]
    training: dict[str, Any]
    model: dict[str, Any]
    spec: list[dict[str, Any]]


class WorkCancelled(BaseModel):
    assignment_id: int
    status: Literal[AssignmentStatus.CANCELLED]
    reason: str
    task_id: int
    round_id: int
    base_version: int


class UploadAccepted(BaseModel):
    update_id: int
    assignment_id: int
    task_id: int
    base_version: int
    staleness: int
    weight: float
    status: UpdateStatus
    duplicate: bool
    num_examples_counted: int = Field(
        description="How many of the claimed examples the weight counts (the claim, bounded "
        "by the task's rules; docs/rounds.md, 'Update bounds')"
    )


class DeviceMetrics(Strict):
    """What a device reports about its training and local evaluation (all optional)."""

    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    num_eval_examples: int | None = Field(default=None, ge=0, le=2**62)
    train_time_s: float | None = Field(default=None, ge=0.0)
