"""Direct database access for tests: read what the API stored, insert rows the round engine
would write (rounds, assignments, model versions)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.blobstore import FileBlobStore
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.models import Assignment, ModelVersion, Round
from fedge.coordinator.settings import Settings


@contextmanager
def db_session(settings: Settings) -> Iterator[Session]:
    """A committed-on-exit session on the coordinator's database."""
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()


def add_round(settings: Settings, *, task_id: int, number: int, **fields: Any) -> int:
    values: dict[str, Any] = {"base_version": 0, "status": "open", "opened_at": utcnow()}
    values.update(fields)
    with db_session(settings) as s:
        rnd = Round(task_id=task_id, number=number, **values)
        s.add(rnd)
        s.flush()
        return rnd.id


def add_assignment(
    settings: Settings,
    *,
    task_id: int,
    device_id: str,
    round_number: int = 1,
    base_version: int = 0,
    status: str = "assigned",
) -> int:
    """An assignment of ``device_id`` in round ``round_number`` (created if missing)."""
    with db_session(settings) as s:
        rnd = s.scalar(select(Round).where(Round.task_id == task_id, Round.number == round_number))
        if rnd is None:
            rnd = Round(
                task_id=task_id, number=round_number, base_version=base_version, status="open"
            )
            s.add(rnd)
            s.flush()
        a = Assignment(
            task_id=task_id,
            round_id=rnd.id,
            device_id=device_id,
            base_version=base_version,
            status=status,
            lease_expires_at=utcnow() + timedelta(minutes=5),
        )
        s.add(a)
        s.flush()
        return a.id


def add_model_version(
    settings: Settings, *, task_id: int, version: int, data: bytes, **fields: Any
) -> str:
    """Store ``data`` as a blob and a model version row naming it; the digest."""
    digest = FileBlobStore(settings.blobs).put(data)
    with db_session(settings) as s:
        s.add(
            ModelVersion(
                task_id=task_id,
                version=version,
                blob_digest=digest,
                size_bytes=len(data),
                **fields,
            )
        )
    return digest
