"""Engine and session handling. Nothing is created at import time."""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    CheckConstraint,
    ColumnElement,
    Connection,
    DateTime,
    Engine,
    String,
    create_engine,
    event,
    literal_column,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import PendingRollbackError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

#: Execution option marking a transaction that only reads (see :func:`make_engine`).
READ_ONLY_OPTION = "fedge_read_only"
READ_ONLY: dict[str, Any] = {READ_ONLY_OPTION: True}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


E = TypeVar("E", bound=StrEnum)


class StatusType(TypeDecorator[E]):
    """A status column: stores the enum's string value, reads back the enum member.

    Plain strings of a member's value are accepted. Any other value (``TaskStatus("runing")``
    raises) is refused when the statement's parameters are processed, before anything is sent
    to the database (``StatementError`` wrapping the ``ValueError``); the column's CHECK
    constraint (:func:`status_check`) refuses it in the database too, for writes that bypass
    the ORM.
    """

    impl = String(16)
    cache_ok = True

    def __init__(self, enum_cls: type[E]) -> None:
        super().__init__(16)
        self.enum_cls = enum_cls

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_cls(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_cls(value)


#: What a state value written into SQL text may be made of (see :func:`in_states`).
_STATE_VALUE = re.compile(r"^[a-z_]{1,16}$")


def in_states(column: Any, states: tuple[StrEnum, ...]) -> ColumnElement[bool]:
    """``column IN ('a', 'b')`` over a fixed set of states, the values written into the
    statement's SQL text. ``column.in_(states)`` binds them as an expanding parameter, which
    SQLAlchemy renders into the SQL string again at every execution (a regular-expression
    pass over the statement, then one bound value per state): on the device routes' hot
    statements that was about 5 % of the coordinator's Python time. The values are the
    members of a status enum, checked against ``[a-z_]`` here, so nothing from a request
    ever reaches this text."""
    values = [state.value for state in states]
    for value in values:
        if not _STATE_VALUE.match(value):
            raise ValueError(f"not a state value: {value!r}")
    return column.in_([literal_column(f"'{value}'") for value in values])


def status_check(enum_cls: type[StrEnum], column: str = "status") -> CheckConstraint:
    """``CHECK (status IN (...))`` over the enum's values, named ``ck_<table>_<column>`` by the
    models' naming convention."""
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    return CheckConstraint(f"{column} IN ({values})", name=column)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings fedge relies on for each backend.

    SQLite: WAL journal, ``synchronous=FULL`` (a committed update survives power loss),
    foreign keys on, a generous busy timeout, and ``BEGIN IMMEDIATE`` so that concurrent
    writers queue on the lock instead of failing when a read transaction upgrades. A
    transaction opened with :data:`READ_ONLY` (``session_scope(..., read_only=True)``) begins
    deferred instead: it reads a WAL snapshot without taking or waiting for the write lock.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            if conn.get_execution_options().get(READ_ONLY_OPTION):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        _SQLITE_WRITERS[engine] = threading.Lock()
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


#: SQLite engines -> the lock this process's writers of :func:`write_connection` queue on.
_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


@contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` for a short write transaction in SQLAlchemy Core (commit on
    success, rollback on error).

    On SQLite the threads of this process first queue on a lock of the process, and only the
    one holding it takes a pooled connection and the database's write lock (``BEGIN
    IMMEDIATE``). Otherwise every waiting writer would hold a pooled connection while it
    sleeps in SQLite's busy handler (which backs off up to 100 ms between tries): under load
    the pool runs dry, read-only requests wait for a connection, and the write lock sits
    free between the sleepers' tries. Writers in other processes, or outside this function,
    still meet the busy handler, as before.
    """
    lock = _SQLITE_WRITERS.get(engine)
    if lock is None:
        with engine.begin() as conn:
            yield conn
        return
    with lock, engine.begin() as conn:
        yield conn


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session], *, read_only: bool = False) -> Iterator[Session]:
    """Commit on success, roll back on any error (for code outside a request).

    ``read_only=True`` promises that the transaction writes nothing; on SQLite it then does
    not take the write lock (a write in it fails with "database is locked" under contention).
    """
    session = factory()
    try:
        if read_only:
            session.connection(execution_options=READ_ONLY)
        yield session
        session.commit()
    except BaseException:
        _drop_sqlite_connection(session)
        session.rollback()
        raise
    finally:
        session.close()


def _drop_sqlite_connection(session: Session) -> None:
    """Roll back and close (instead of pooling) the SQLite connection of a failed transaction.

    An error raised while a query's result was still unread leaves that statement active, and
    on SQLite an active statement keeps its read snapshot past a rollback: a pooled connection
    in that state fails every later ``BEGIN IMMEDIATE`` at once with "database is locked" as
    soon as another connection has written. So the transaction is rolled back first (that
    releases the write lock) and the connection is then invalidated; the pool opens a fresh
    one when needed. The closed connection's snapshot ends with the last reference to the
    result, and a snapshot blocks no writer.

    A session whose flush failed (a unique constraint, say) has already rolled its
    connection back and refuses to hand it out; a failed INSERT or UPDATE leaves no result
    open, so there is nothing to drop.
    """
    if not session.in_transaction():
        return
    try:
        connection = session.connection()
    except PendingRollbackError:
        return
    if connection.dialect.name != "sqlite":
        return
    dbapi = connection.connection.dbapi_connection
    if dbapi is not None:
        dbapi.rollback()
    connection.invalidate()
