"""Named leases in the ``leases`` table: one coordinator process acts for a task at a time.

``acquire`` succeeds when the lease is free, expired, or already ours, and (re)sets its expiry.
It is one conditional ``UPDATE`` (or an ``INSERT ... ON CONFLICT DO NOTHING`` for a new name)
and so atomic on both backends: on PostgreSQL a concurrent ``UPDATE`` of the same row waits
for the first to commit and then re-evaluates the condition against the new holder; SQLite
serializes writers (``BEGIN IMMEDIATE``).

The lease is for efficiency (only one process does a task's work). Correctness does not rest
on it: every aggregation re-checks the task's version under a row lock in its commit
transaction, and ``(task_id, version)`` is unique, so even a process that lost its lease
mid-step cannot apply an update twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fedge.coordinator.models import Lease


def task_lease_name(task_id: int) -> str:
    return f"task:{task_id}"


def acquire(session: Session, name: str, *, holder: str, ttl_s: float, now: datetime) -> bool:
    """Take or renew the lease ``name`` for ``holder`` until ``now + ttl_s``."""
    expires = now + timedelta(seconds=ttl_s)
    result = session.execute(
        update(Lease)
        .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=expires)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        return True
    dialect = session.get_bind().dialect.name
    values = {"name": name, "holder": holder, "expires_at": expires}
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Lease).values(**values).on_conflict_do_nothing()
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def release(session: Session, name: str, *, holder: str) -> None:
    """Give up ``name`` if ``holder`` holds it (e.g. at shutdown)."""
    session.execute(
        delete(Lease)
        .where(Lease.name == name, Lease.holder == holder)
        .execution_options(synchronize_session=False)
    )


def release_all(session: Session, *, holder: str) -> None:
    session.execute(
        delete(Lease).where(Lease.holder == holder).execution_options(synchronize_session=False)
    )
