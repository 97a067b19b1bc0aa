"""Device-reported metrics (``POST /device/assignments/{id}/metrics``).

A device may report before or after it uploads its update, and before or after that update
is aggregated. The metrics are kept on the assignment and copied onto its update (at upload,
or here if the update already exists); if the update is already applied, the metrics of the
round and model version it went into are recomputed so nothing reported late is lost.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.engine.ownership import own_assignment
from coordinator.engine.rounds import version_client_metrics
from coordinator.models import ModelVersion, Round, Update
from coordinator.states import UpdateStatus


def record_metrics(
    session: Session, *, device_id: str, assignment_id: int, metrics: dict[str, Any]
) -> None:
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id)
    a.metrics = {**(a.metrics or {}), **metrics}
    u = session.scalar(select(Update).where(Update.assignment_id == a.id))
    if u is None:
        return
    u.metrics = {**(u.metrics or {}), **metrics}
    session.flush()
    if u.status != UpdateStatus.APPLIED or u.applied_version is None:
        return
    client = version_client_metrics(session, u.task_id, u.applied_version)
    for row in (
        session.scalar(
            select(Round).where(
                Round.task_id == u.task_id, Round.result_version == u.applied_version
            )
        ),
        session.scalar(
            select(ModelVersion).where(
                ModelVersion.task_id == u.task_id, ModelVersion.version == u.applied_version
            )
        ),
    ):
        if row is not None:
            server = {k: v for k, v in (row.metrics or {}).items() if k.startswith("server_")}
            row.metrics = {**client, **server}
    session.flush()
