"""API keys of administrators (role ``admin``) and read-only users (role ``viewer``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedge.coordinator.schemas.common import Label, Page, Strict

Role = Literal["admin", "viewer"]


class ApiKeyCreate(Strict):
    model_config = ConfigDict(
        **Strict.model_config,
        json_schema_extra={"examples": [{"name": "dashboard", "role": "viewer"}]},
    )

    name: Label = ""
    role: Role


class ApiKeyPublic(BaseModel):
    id: int
    prefix: str = Field(description="First characters of the secret, to recognize it")
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The secret; shown only in this answer")


class ApiKeysPublic(Page[ApiKeyPublic]):
    pass
