"""What a device downloads: delta chains between broadcast models (fedge.shared.broadcast),
and the mark that an assignment's base model reached its device.

Used by the model download route and by the work long-poll, whose answer can carry the chain
to its base model so the device needs no separate download request.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedge.coordinator.blobstore import BlobNotFound, BlobStore
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.models import Assignment, ModelVersion
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.states import AssignmentStatus
from fedge.shared.wire_delta import MAX_CHAIN, encode_chain


def delta_chain(
    session: Session, blobs: BlobStore, task_id: int, have: int, row: ModelVersion
) -> bytes | None:
    """The deltas from version ``have`` to ``row``'s as one chain, or ``None`` when one is
    missing (never written, or pruned by the retention policy) or the chain would not be
    smaller than the full model."""
    count = row.version - have
    if not 1 <= count <= MAX_CHAIN:
        return None
    links = session.execute(
        select(ModelVersion.delta_digest, ModelVersion.delta_size)
        .where(
            ModelVersion.task_id == task_id,
            ModelVersion.version > have,
            ModelVersion.version <= row.version,
            ModelVersion.pruned_at.is_(None),
        )
        .order_by(ModelVersion.version)
    ).all()
    digests = [digest for digest, _ in links if digest is not None]
    sizes = [size for _, size in links if size is not None]
    if len(links) != count or len(digests) != count or len(sizes) != count:
        return None
    if sum(sizes) >= row.served_size:
        return None
    try:
        data = encode_chain([blobs.get(digest) for digest in digests])
    except BlobNotFound:
        return None
    return data if len(data) < row.served_size else None


def mark_downloaded(session: Session, *, task_id: int, device_id: str, version: int) -> None:
    """The device's ``assigned`` assignments on ``version`` of the task are ``downloaded``."""
    session.execute(
        update(Assignment)
        .where(
            Assignment.task_id == task_id,
            Assignment.device_id == device_id,
            Assignment.base_version == version,
            Assignment.status == AssignmentStatus.ASSIGNED,
        )
        .values(status=AssignmentStatus.DOWNLOADED, downloaded_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def inline_chain(
    runtime: Runtime, device_id: str, payload: dict[str, Any], have: tuple[int, int]
) -> bytes | None:
    """The chain from the device's held version to the base model of the assignment in
    ``payload`` (a work answer), when the device holds an older version of that task and the
    chain exists; the assignment is marked ``downloaded`` then, as a download would."""
    task_id, held = have
    if payload.get("task_id") != task_id or payload.get("status") == AssignmentStatus.CANCELLED:
        return None
    version = payload.get("base_version")
    if not isinstance(version, int) or version <= held:
        return None
    with session_scope(runtime.sessions) as session:
        row = session.scalar(
            select(ModelVersion).where(
                ModelVersion.task_id == task_id, ModelVersion.version == version
            )
        )
        if row is None:
            return None
        chain = delta_chain(session, runtime.blobs, task_id, held, row)
        if chain is not None:
            mark_downloaded(session, task_id=task_id, device_id=device_id, version=version)
        return chain
