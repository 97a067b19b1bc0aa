"""Enrollment tokens: secrets devices present once, at enrollment."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedge.coordinator.schemas.common import Label, Page, Strict

TokenStatus = Literal["active", "expired", "used_up", "revoked"]
MAX_TOKEN_TTL_S = 366 * 24 * 3600


class TokenCreate(Strict):
    model_config = ConfigDict(
        **Strict.model_config,
        json_schema_extra={"examples": [{"label": "lab", "max_uses": 20, "expires_in_s": 3600}]},
    )

    label: Label = ""
    max_uses: int = Field(default=1, ge=1, le=1_000_000, description="Enrollments allowed")
    expires_in_s: int = Field(
        default=24 * 3600, ge=1, le=MAX_TOKEN_TTL_S, description="Lifetime in seconds"
    )


class TokenPublic(BaseModel):
    id: int
    prefix: str = Field(description="First characters of the secret, to recognize it")
    label: str
    max_uses: int
    uses: int
    status: TokenStatus
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret; shown only in this answer")


class TokensPublic(Page[TokenPublic]):
    pass
