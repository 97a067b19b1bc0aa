"""Retention of model versions and garbage collection of blobs (mark and sweep).

One run (:func:`collect_garbage`) does three things:

1. **Prune**: per task, the versions that fell out of its kept window get ``pruned_at``. Kept
   are version 0, the newest ``keep_versions`` versions (the task's aggregation config, else
   the coordinator's ``keep_versions`` setting; 0 keeps every version), the base versions of
   open rounds and of assignments still in progress (a device may not have downloaded it
   yet), and any version whose successor ``keep_versions`` versions later is younger than the
   grace period (a device may be fetching it or a chain through it right now). A pruned row
   stays: its number, digests and metrics remain, the API answers 410 ``version_pruned`` for
   its model, and a delta chain through it is replaced by the full model.
2. **Mark**: the digests named by rows that are kept: every column of a version not pruned
   (true model, broadcast model, delta), every task's server optimizer state, and the updates
   still waiting for aggregation (``accepted``) of tasks not finished. Three queries, whatever
   the number of blobs.
3. **Sweep**: every stored blob that is not marked and was written longer ago than the grace
   period is deleted (:meth:`BlobStore.delete_if_older`, which re-checks the write time).

Why this never deletes a blob that a row names: a row's digest is written to the blob store
(``put``, which refreshes the write time of bytes already stored) before the row is committed.
A row committed after the mark names either a blob whose write time is within the grace
period (not a candidate, or put back by ``delete_if_older``) or one that was marked. That holds
while the grace period exceeds the longest time between a ``put`` and its commit (an upload,
an aggregation with its eval hook) and the clock skew between hosts sharing a blob store.

Two coordinators may collect at once: a lease (``gc``) lets one of them do it (for
efficiency), and everything above is safe without it (deleting a blob twice is a no-op,
pruning is a conditional update).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fedge.coordinator.blobstore import BlobInfo, BlobStore
from fedge.coordinator.bootstrap import SetupError
from fedge.coordinator.db import in_states, session_scope
from fedge.coordinator.engine import leases
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.migrate import schema_status
from fedge.coordinator.models import Assignment, Lease, ModelVersion, Round, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ROUND_ACTIVE,
    TASK_TERMINAL,
    UpdateStatus,
)

log = logging.getLogger(__name__)

#: The lease that lets one coordinator collect at a time.
LEASE_NAME = "gc"
#: How long the lease lasts; renewed while a sweep runs.
LEASE_TTL_S = 600.0
#: Rows updated per statement when pruning.
PRUNE_CHUNK = 500


class GcBusy(RuntimeError):
    """Another coordinator holds the garbage collection lease."""


@dataclass
class GcReport:
    """What one run did (or, with ``dry_run``, would do)."""

    dry_run: bool
    grace_s: float
    versions_pruned: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    blobs_referenced: int = 0
    bytes_referenced: int = 0
    blobs_recent: int = 0
    bytes_recent: int = 0
    stopped: bool = False
    seconds: float = 0.0
    pruned: dict[int, list[int]] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The counts as flat key/value fields (logs, the CLI)."""
        return {
            "dry_run": self.dry_run,
            "grace_s": self.grace_s,
            "versions_pruned": self.versions_pruned,
            "blobs_deleted": self.blobs_deleted,
            "bytes_deleted": self.bytes_deleted,
            "blobs_referenced": self.blobs_referenced,
            "bytes_referenced": self.bytes_referenced,
            "blobs_recent": self.blobs_recent,
            "bytes_recent": self.bytes_recent,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
        }


# ------------------------------------------------------------------------------ policy


def keep_versions_of(aggregation: Any, default: int) -> int:
    """The number of newest versions a task keeps (0: all), from its stored aggregation
    config. A config that does not parse keeps everything: nothing is deleted on a guess."""
    try:
        cfg = AggregationConfig.from_dict(aggregation)
    except ConfigError:
        return 0
    return default if cfg.keep_versions is None else cfg.keep_versions


def plan_pruning(
    session: Session, *, default_keep: int, settled_before: datetime
) -> dict[int, dict[int, int]]:
    """``{task_id: {version: row id}}`` of the versions the policy releases now."""
    tasks = session.execute(select(Task.id, Task.aggregation, Task.current_version)).all()
    windows = {
        task_id: keep
        for task_id, aggregation, current in tasks
        if (keep := keep_versions_of(aggregation, default_keep)) > 0 and current - keep >= 1
    }
    if not windows:
        return {}
    # Versions whose successor ``keep`` versions later is older than the grace period.
    settled: dict[int, int] = dict(
        session.execute(
            select(ModelVersion.task_id, func.max(ModelVersion.version))
            .where(ModelVersion.created_at <= settled_before)
            .group_by(ModelVersion.task_id)
        ).all()
    )
    protected: dict[int, set[int]] = {}
    in_progress = [
        select(Assignment.task_id, Assignment.base_version)
        .where(in_states(Assignment.status, ASSIGNMENT_ACTIVE))
        .distinct(),
        select(Round.task_id, Round.base_version).where(in_states(Round.status, ROUND_ACTIVE)),
    ]
    for stmt in in_progress:
        for task_id, base in session.execute(stmt):
            protected.setdefault(task_id, set()).add(base)
    current = {task_id: version for task_id, _, version in tasks}
    plan: dict[int, dict[int, int]] = {}
    for task_id, keep in windows.items():
        last = min(current[task_id], settled.get(task_id, -1)) - keep
        if last < 1:
            continue
        rows = session.execute(
            select(ModelVersion.id, ModelVersion.version).where(
                ModelVersion.task_id == task_id,
                ModelVersion.version.between(1, last),
                ModelVersion.pruned_at.is_(None),
            )
        ).all()
        kept = protected.get(task_id, set())
        released = {v: row_id for row_id, v in rows if v not in kept}
        if released:
            plan[task_id] = released
    return plan


def prune(session: Session, ids: Iterable[int], *, now: datetime) -> int:
    """Mark the version rows ``ids`` pruned (those not pruned already); how many were."""
    pending = list(ids)
    count = 0
    for start in range(0, len(pending), PRUNE_CHUNK):
        result = session.execute(
            update(ModelVersion)
            .where(
                ModelVersion.id.in_(pending[start : start + PRUNE_CHUNK]),
                ModelVersion.pruned_at.is_(None),
            )
            .values(pruned_at=now)
            .execution_options(synchronize_session=False)
        )
        count += result.rowcount  # type: ignore[attr-defined]
    return count


# -------------------------------------------------------------------------------- mark


def referenced_digests(session: Session, *, excluding: Iterable[int] = ()) -> set[str]:
    """Every digest a kept row names (module docstring); the version rows ``excluding`` (ids)
    count as pruned (a dry run's plan)."""
    skip = set(excluding)
    marked: set[str] = set()
    versions = session.execute(
        select(
            ModelVersion.id,
            ModelVersion.blob_digest,
            ModelVersion.broadcast_digest,
            ModelVersion.delta_digest,
        )
        .where(ModelVersion.pruned_at.is_(None))
        .execution_options(yield_per=5000)
    )
    for row_id, *digests in versions:
        if row_id not in skip:
            marked.update(d for d in digests if d is not None)
    marked.update(
        session.scalars(
            select(Task.optimizer_state_digest).where(Task.optimizer_state_digest.is_not(None))
        )
    )
    marked.update(
        session.scalars(
            select(Update.blob_digest)
            .join(Task, Task.id == Update.task_id)
            .where(Update.status == UpdateStatus.ACCEPTED, Task.status.not_in(TASK_TERMINAL))
            .execution_options(yield_per=5000)
        )
    )
    return marked


# ------------------------------------------------------------------------------- a run


def collect_garbage(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    *,
    default_keep: int,
    grace_s: float,
    holder: str,
    dry_run: bool = False,
    should_stop: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.time,
) -> GcReport:
    """Prune, mark and sweep once (module docstring). :class:`GcBusy` when another
    coordinator holds the lease (a dry run changes nothing and takes no lease).
    ``should_stop`` is asked between blobs; a stopped run reports ``stopped``."""
    started = time.perf_counter()
    report = GcReport(dry_run=dry_run, grace_s=grace_s)
    holder = f"{holder}:gc"
    if not dry_run and not _take_lease(sessions, holder, clock):
        raise GcBusy("another coordinator is collecting garbage now")
    try:
        now = clock()
        cutoff = now - grace_s
        with session_scope(sessions) as session:
            plan = plan_pruning(
                session,
                default_keep=default_keep,
                settled_before=_utc(cutoff),
            )
            planned = [row_id for ids in plan.values() for row_id in ids.values()]
            if dry_run:
                report.versions_pruned = len(planned)
            else:
                report.versions_pruned = prune(session, planned, now=_utc(now))
        report.pruned = {task_id: sorted(ids) for task_id, ids in plan.items()}
        with sessions() as session:
            marked = referenced_digests(session, excluding=planned if dry_run else ())
        _sweep(sessions, blobs, marked, cutoff, report, holder, clock, should_stop)
    finally:
        if not dry_run:
            _release_lease(sessions, holder)
    report.seconds = time.perf_counter() - started
    return report


def run_once(
    settings: Settings, *, dry_run: bool = False, grace_s: float | None = None
) -> GcReport:
    """One run on the configured database and blob store (``fedge coordinator gc``).
    :class:`SetupError` when the schema is not at head, :class:`GcBusy` when another
    coordinator is collecting."""
    runtime = Runtime.open(settings)
    try:
        ok, detail = schema_status(runtime.engine)
        if not ok:
            raise SetupError(detail)
        return collect_garbage(
            runtime.sessions,
            runtime.blobs,
            default_keep=settings.keep_versions,
            grace_s=settings.gc_grace_s if grace_s is None else grace_s,
            holder=settings.instance_id,
            dry_run=dry_run,
        )
    finally:
        runtime.close()


def _sweep(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    marked: set[str],
    cutoff: float,
    report: GcReport,
    holder: str,
    clock: Callable[[], float],
    should_stop: Callable[[], bool] | None,
) -> None:
    renewed = clock()
    listing: Iterator[BlobInfo] = blobs.list_blobs()
    try:
        for info in listing:
            if should_stop is not None and should_stop():
                report.stopped = True
                return
            if info.digest in marked:
                report.blobs_referenced += 1
                report.bytes_referenced += info.size
            elif info.written_at >= cutoff:
                report.blobs_recent += 1
                report.bytes_recent += info.size
            elif report.dry_run or blobs.delete_if_older(info.digest, cutoff):
                report.blobs_deleted += 1
                report.bytes_deleted += info.size
            if not report.dry_run and clock() - renewed > LEASE_TTL_S / 3:
                _take_lease(sessions, holder, clock)
                renewed = clock()
    finally:
        close = getattr(listing, "close", None)
        if close is not None:  # a listing stopped early releases its directory handles
            close()


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, tz=UTC)


def _take_lease(sessions: sessionmaker[Session], holder: str, clock: Callable[[], float]) -> bool:
    with session_scope(sessions) as session:
        leases.acquire(session, LEASE_NAME, holder=holder, ttl_s=LEASE_TTL_S, now=_utc(clock()))
        # Read back rather than trust acquire's answer: on PostgreSQL (psycopg 3) the
        # rowcount of its INSERT ... ON CONFLICT DO NOTHING is -1 when the row exists.
        return session.scalar(select(Lease.holder).where(Lease.name == LEASE_NAME)) == holder


def _release_lease(sessions: sessionmaker[Session], holder: str) -> None:
    try:
        with session_scope(sessions) as session:
            leases.release(session, LEASE_NAME, holder=holder)
    except Exception:  # the lease expires on its own
        log.exception("gc_lease_release_failed holder=%s", holder)


__all__ = [
    "GcBusy",
    "GcReport",
    "collect_garbage",
    "keep_versions_of",
    "plan_pruning",
    "prune",
    "referenced_digests",
    "run_once",
]
