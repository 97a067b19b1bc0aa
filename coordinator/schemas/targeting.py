"""Task targeting (docs/rounds.md, "Eligibility"): a task's requirements, a device's tags and
capability report, and a device's decline of an assignment."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from fedge.coordinator.schemas.common import Page, Strict, Text
from fedge.shared.targeting import DECLINE_REASONS, MAX_DECLINE_DETAIL

#: A device tag: 1..64 of letters, digits and ``_.:-`` (e.g. ``site:berlin``, ``gpu``).
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Tags = Annotated[list[Tag], Field(max_length=32)]
#: A trainer name as a task's ``training.trainer`` gives it.
TrainerName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]
Dimension = Annotated[int, Field(ge=1, le=2**31 - 1)]
FeatureShape = Annotated[list[Dimension], Field(min_length=1, max_length=8)]
LabelKind = Literal["class", "value"]
DeclineReason = Literal[DECLINE_REASONS]  # type: ignore[valid-type]


class TaskRequirements(Strict):
    """What a device must offer to be given the task's work. Every field is optional; a
    device qualifies when it meets all that are given (docs/rounds.md, "Eligibility")."""

    tags: Tags = Field(default_factory=list, description="Tags the device must all carry")
    trainer: TrainerName | None = Field(
        default=None, description="A trainer the device must report among its `trainers`"
    )
    feature_shape: FeatureShape | None = Field(
        default=None, description="The shape of one example of the device's data, exactly"
    )
    label_kind: LabelKind | None = Field(
        default=None, description="`class` (integer labels) or `value` (real targets)"
    )
    min_examples: int | None = Field(
        default=None, ge=1, le=2**53, description="Training examples the device must hold"
    )


class CapabilitiesReport(Strict):
    """What a device says it can do (``PUT /device/capabilities``). Each report replaces the
    device's previous one (fields left out are forgotten); other keys of its capabilities,
    e.g. those given at enrollment, stay."""

    trainers: Annotated[list[TrainerName], Field(max_length=64)] = Field(default_factory=list)
    feature_shape: FeatureShape | None = None
    label_kind: LabelKind | None = None
    num_examples: int | None = Field(default=None, ge=0, le=2**53)
    poll_interval_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="How often the device polls for work (its long-poll wait): the "
        "coordinator counts it unreachable after `device_liveness_polls` of these unseen",
    )


class DeviceUpdate(Strict):
    """An administrator's change to a device: its tags (the whole list)."""

    tags: Tags


class DeclineRequest(Strict):
    reason: DeclineReason = Field(description="Why, as a code (docs/protocol.md, 'Decline')")
    detail: Annotated[Text, Field(max_length=MAX_DECLINE_DETAIL)] = ""


class DeclinePublic(BaseModel):
    assignment_id: int
    device_id: str
    task_id: int
    round_id: int
    round_number: int
    reason: str
    detail: str
    declined_at: datetime | None


class DeclinesPublic(Page[DeclinePublic]):
    pass
