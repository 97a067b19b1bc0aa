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

A step can outlast the TTL (an aggregation of 10,000 updates takes tens of seconds), so the
scheduler holds each task's lease through a :class:`LeaseKeeper` while the step runs: one
background thread per process renews every held lease each ``ttl / 3``. A renewal that finds
the lease taken by another holder marks the :class:`Hold` lost and logs it; the step then
starts no further aggregation (what it commits is still checked as above).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.models import Lease

log = logging.getLogger(__name__)


def task_lease_name(task_id: int) -> str:
    return f"task:{task_id}"


def acquire(session: Session, name: str, *, holder: str, ttl_s: float, now: datetime) -> bool:
    """Take or renew the lease ``name`` for ``holder`` until ``now + ttl_s``.

    What was written is read back with ``RETURNING``, not from the row count: psycopg
    reports -1 rows for an ``INSERT ... ON CONFLICT DO NOTHING`` that inserted nothing."""
    expires = now + timedelta(seconds=ttl_s)
    taken = session.scalar(
        update(Lease)
        .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=expires)
        .returning(Lease.name)
        .execution_options(synchronize_session=False)
    )
    if taken is not None:
        return True
    dialect = session.get_bind().dialect.name
    values = {"name": name, "holder": holder, "expires_at": expires}
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Lease).values(**values).on_conflict_do_nothing().returning(Lease.name)
    return session.scalar(stmt) is not None


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


def renew(
    session: Session, names: list[str], *, holder: str, ttl_s: float, now: datetime
) -> set[str]:
    """Push the expiry of those of ``names`` that ``holder`` still holds to ``now + ttl_s``
    (expired or not, as long as nobody took them over); the names renewed."""
    if not names:
        return set()
    renewed = session.scalars(
        update(Lease)
        .where(Lease.name.in_(names), Lease.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl_s))
        .returning(Lease.name)
        .execution_options(synchronize_session=False)
    )
    return set(renewed)


class Hold:
    """One lease held by a running step (see :meth:`LeaseKeeper.hold`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: ``time.monotonic()`` of the last acquisition or renewal.
        self.renewed_at = time.monotonic()
        self.renewals = 0
        self._lost = threading.Event()

    @property
    def lost(self) -> bool:
        """True once a renewal found the lease held by someone else."""
        return self._lost.is_set()


class LeaseKeeper:
    """Renews the leases of the steps running in this process, from one background thread.

    :meth:`hold` registers a lease just acquired for the duration of a ``with`` block; every
    ``ttl_s / 3`` the thread renews (one ``UPDATE ... RETURNING`` for all of them) those held
    at least that long. The thread starts with the first hold and ends after an idle
    interval with none, so a process whose steps are all short renews nothing."""

    def __init__(self, sessions: sessionmaker[Session], *, holder: str, ttl_s: float) -> None:
        self.sessions = sessions
        self.holder = holder
        self.ttl_s = ttl_s
        self.interval = ttl_s / 3
        self._cond = threading.Condition()
        self._held: dict[str, Hold] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def hold(self, name: str) -> Iterator[Hold]:
        """Keep ``name`` (acquired by the caller just now) renewed until the block ends."""
        held = Hold(name)
        with self._cond:
            if name in self._held:
                raise RuntimeError(f"lease {name} is already held by a step of this process")
            self._held[name] = held
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="fedge-lease-keeper", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        try:
            yield held
        finally:
            with self._cond:
                self._held.pop(name, None)
                self._cond.notify_all()

    def close(self) -> None:
        """Stop renewing (at shutdown, before the leases are released)."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                if self._closed:
                    self._thread = None
                    return
                now = time.monotonic()
                live = [h for h in self._held.values() if not h.lost]
                due = [h for h in live if now >= h.renewed_at + self.interval]
                if not due:
                    if live:
                        idle_since = None
                        wait = min(h.renewed_at for h in live) + self.interval - now
                    elif idle_since is None or now - idle_since < self.interval:
                        idle_since = now if idle_since is None else idle_since
                        wait = self.interval
                    else:
                        self._thread = None
                        return
                    self._cond.wait(max(wait, 0.001))
                    continue
            self._renew(due)

    def _renew(self, due: list[Hold]) -> None:
        started = time.monotonic()
        try:
            with session_scope(self.sessions) as session:
                renewed = renew(
                    session,
                    [h.name for h in due],
                    holder=self.holder,
                    ttl_s=self.ttl_s,
                    now=utcnow(),
                )
        except Exception:
            log.exception("could not renew leases %s; retrying", [h.name for h in due])
            renewed = None
        for held in due:
            held.renewed_at = started
            if renewed is None:
                continue
            if held.name in renewed:
                held.renewals += 1
            else:
                held._lost.set()
                log.warning(
                    "lease %s was taken over by another holder during a step of %s; the "
                    "step's commit is still checked against the task's version, and it "
                    "starts no further aggregation",
                    held.name,
                    self.holder,
                )
