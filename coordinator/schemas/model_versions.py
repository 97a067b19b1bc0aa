"""Model versions of a task (version 0 is the initial model)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from fedge.coordinator.schemas.common import Page


class ModelVersionPublic(BaseModel):
    task_id: int
    version: int
    digest: str = Field(description="SHA-256 of the float32 wire encoding (the ETag)")
    size_bytes: int
    round_id: int | None = Field(description="The round that produced it (none for version 0)")
    num_updates: int
    metrics: dict[str, Any]
    created_at: datetime
    pruned_at: datetime | None = Field(
        default=None,
        description="When the retention policy released the version's blobs (its model then "
        "answers 410 version_pruned); null while it is kept",
    )


class ModelVersionsPublic(Page[ModelVersionPublic]):
    pass
