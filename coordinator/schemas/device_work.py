"""Bodies of the device's work cycle (docs/protocol.md): the work long-poll's answers, the
upload's answer and a separate metrics report."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from fedge.coordinator.schemas.common import Strict
from fedge.coordinator.states import AssignmentStatus, UpdateStatus
from fedge.shared.wiremetrics import check_metrics


class WorkAssignment(BaseModel):
    assignment_id: int
    status: AssignmentStatus
    task_id: int
    round_id: int
    mode: Literal["sync", "async"]
    base_version: int
    deadline: datetime | None = Field(default=None, description="When the assignment's lease ends")
    model_url: str
    upload_url: str
    config_digest: str = Field(
        description="Digest of the task's compression, training, model and spec; a poll that "
        "sends it back as `known` gets them left out while they stay the same"
    )
    compression: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    spec: list[dict[str, Any]] | None = None
    model_delta_from: int | None = Field(
        default=None,
        description="Only in a work frame: the version the delta chain after the JSON starts at",
    )
    secure_aggregation: bool | None = Field(
        default=None,
        description="True when the round runs secure aggregation: the device posts the "
        "round's messages under /device/secagg/{round_id}/ instead of uploading its update",
    )


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
    next: WorkAssignment | None = Field(
        default=None,
        description="With `next=1`: the device's next assignment, when one is there at once "
        "(the work poll's answer; absent: poll for work as usual)",
    )


class UploadReceipt(BaseModel):
    """The short answer to an upload sent with ``Prefer: return=minimal``."""

    update_id: int
    staleness: int
    duplicate: bool
    next: WorkAssignment | None = None


class DeviceMetrics(Strict):
    """What a device reports about its training and local evaluation (all optional). The
    names and the rules for their values are the update's metrics block's
    (:mod:`fedge.shared.wiremetrics`): losses finite, ``eval_accuracy`` in [0, 1],
    ``num_eval_examples`` a whole number in [0, 2**62), ``train_time_s`` >= 0."""

    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    num_eval_examples: int | None = None
    train_time_s: float | None = None

    @model_validator(mode="after")
    def _values_follow_the_wire_rules(self) -> DeviceMetrics:
        check_metrics(self.model_dump(exclude_none=True))
        return self
