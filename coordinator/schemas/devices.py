"""Devices: enrollment request/answer and the device record."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from fedge.coordinator.schemas.common import DeviceName, JsonObject, Page, Strict
from fedge.coordinator.schemas.targeting import Tags
from fedge.coordinator.states import DeviceStatus
from fedge.shared.signing import public_key_from_b64, public_key_to_b64


class EnrollRequest(Strict):
    token: str = Field(min_length=1, max_length=200, description="Enrollment token secret")
    public_key: str = Field(
        min_length=1,
        max_length=100,
        description="Standard base64 of the raw 32-byte Ed25519 public key",
    )
    name: DeviceName
    capabilities: JsonObject = Field(default_factory=dict)
    tags: Tags = Field(
        default_factory=list, description="Labels tasks can require (docs/rounds.md)"
    )

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        # Re-encode so one key has exactly one stored form (base64 admits aliases).
        return public_key_to_b64(public_key_from_b64(value))


class EnrollResponse(BaseModel):
    device_id: str
    name: str
    enrolled_at: datetime


class DevicePublic(BaseModel):
    device_id: str
    name: str
    status: DeviceStatus
    public_key: str
    capabilities: dict[str, Any]
    capabilities_at: datetime | None = Field(
        description="When the device last reported its capabilities (null: never)"
    )
    tags: list[str]
    enrolled_at: datetime
    last_seen_at: datetime | None
    revoked_at: datetime | None
    enrollment_token_id: int | None
    num_assigned: int
    num_completed: int
    num_dropped: int
    num_declined: int
    #: Updates the task's L2 norm bound scaled down at aggregation / refused at upload.
    num_norm_clipped: int = 0
    num_norm_refused: int = 0


class DevicesPublic(Page[DevicePublic]):
    pass
