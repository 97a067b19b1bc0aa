"""Session handling: a transaction that fails while a query result is still open leaves no
trace on the connection pool."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope
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
