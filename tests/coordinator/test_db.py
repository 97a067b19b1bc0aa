"""Session handling: a transaction that fails while a query result is still open leaves no
trace on the connection pool."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, update

from fedge.coordinator.db import (
    READ_ONLY,
    make_engine,
    make_sessionmaker,
    session_scope,
    write_connection,
)
from fedge.coordinator.models import Device


class _Boom(Exception):
    pass


def test_an_error_with_a_result_still_open_does_not_lock_later_writers(db_url: str) -> None:
    """On SQLite an active statement keeps its read snapshot past a rollback, and a pooled
    connection holding one failed every later write with "database is locked"."""
    engine = make_engine(db_url)
    other = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        with session_scope(sessions) as session:
            session.add_all(
                Device(id=f"dev-{i}", name=f"d{i}", public_key=f"{i:044d}", status="active")
                for i in range(500)
            )
        for read_only in (True, False):
            with pytest.raises(_Boom), session_scope(sessions, read_only=read_only) as session:
                # Executed, not yet iterated: the ORM result reads its rows on first use, so
                # the statement is still active when the error comes.
                rows = session.execute(select(Device.id).order_by(Device.id))
                raise _Boom(rows)
            # Someone else writes in between.
            with session_scope(make_sessionmaker(other)) as session:
                session.execute(update(Device).values(num_assigned=Device.num_assigned + 1))
            # Every connection of the pool can write again.
            for _ in range(3):
                with session_scope(sessions) as session:
                    session.execute(update(Device).values(num_completed=Device.num_completed + 1))
        with session_scope(sessions, read_only=True) as session:
            assert session.scalar(select(func.sum(Device.num_completed))) == 500 * 2 * 3
    finally:
        engine.dispose()
        other.dispose()


def test_sqlite_writers_queue_without_holding_a_pooled_connection(tmp_path) -> None:
    """A writer of ``write_connection`` waiting for another one holds no pooled connection:
    with a pool of two, one held by the first writer, a read still gets the other while a
    second writer waits, and both writes go through in turn."""
    engine = make_engine(
        f"sqlite:///{tmp_path / 'w.db'}", pool_size=2, max_overflow=0, pool_timeout=2
    )
    try:
        with engine.connect() as one, engine.connect() as two:  # both connections opened
            for conn in (one, two):
                conn.execution_options(**READ_ONLY)
                conn.exec_driver_sql("SELECT 1")
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        first_in = threading.Event()
        release = threading.Event()

        def first() -> None:
            with write_connection(engine) as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
                first_in.set()
                release.wait(timeout=30)

        def second() -> None:
            with write_connection(engine) as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (2)")

        a = threading.Thread(target=first)
        a.start()
        assert first_in.wait(timeout=30)
        b = threading.Thread(target=second)
        b.start()
        with engine.connect() as reader:  # the second writer did not take it
            reader.execution_options(**READ_ONLY)
            assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
        release.set()  # the first writer ends, the second one goes on
        a.join(timeout=30)
        b.join(timeout=30)
        with engine.connect() as conn:
            rows = sorted(conn.exec_driver_sql("SELECT x FROM t").scalars())
        assert rows == [1, 2]
    finally:
        engine.dispose()


def test_in_states_selects_what_an_expanding_in_selects_and_is_rendered_once(db_url: str) -> None:
    """``in_states`` writes the states into the SQL text: the same rows as ``in_``, on each
    backend, and the device routes' hot statements carry no parameter that SQLAlchemy would
    render again at every execution."""
    from sqlalchemy.dialects import postgresql, sqlite

    from fedge.coordinator.db import in_states
    from fedge.coordinator.engine import idlestep, scheduler, updates, work
    from fedge.coordinator.states import DeviceStatus

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    try:
        statuses = [DeviceStatus.ACTIVE, DeviceStatus.REVOKED]
        with session_scope(sessions) as session:
            session.add_all(
                Device(id=f"dev-{i}", name=f"d{i}", public_key=f"{i:044d}", status=statuses[i % 2])
                for i in range(7)
            )
        with session_scope(sessions, read_only=True) as session:
            for states in ((DeviceStatus.REVOKED,), tuple(statuses), ()):
                ids = select(Device.id).order_by(Device.id)
                expected = session.scalars(ids.where(Device.status.in_(states))).all()
                found = session.scalars(ids.where(in_states(Device.status, states))).all()
                assert found == expected
                assert len(found) == {0: 0, 1: 3, 2: 7}[len(states)]
    finally:
        engine.dispose()
    hot = [
        work._ACTIVE_OF_DEVICE,
        work._INSERT_ASYNC,
        updates._HISTORY,
        scheduler._NEEDING_ATTENTION,
        idlestep._LOOK,
        idlestep._COUNT_RECEIVED,
    ]
    for statement in hot:
        for dialect in (sqlite.dialect(), postgresql.psycopg.dialect()):
            compiled = statement.compile(dialect=dialect)
            assert not compiled.post_compile_params, statement
            assert "POSTCOMPILE" not in str(compiled)
    assert "'assigned'" in str(work._ACTIVE_OF_DEVICE.compile(dialect=sqlite.dialect()))


def test_in_states_refuses_a_value_it_would_not_write_into_sql() -> None:
    from enum import StrEnum

    from fedge.coordinator.db import in_states

    class Odd(StrEnum):
        QUOTE = "it's"

    with pytest.raises(ValueError, match="not a state value"):
        in_states(Device.status, (Odd.QUOTE,))
