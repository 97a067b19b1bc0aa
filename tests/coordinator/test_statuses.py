"""Status columns hold only their enum's values: the database refuses anything else (a CHECK
constraint per column, migration 0003), the ORM refuses it before sending it, and the
migration adds and removes the constraints without touching the rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

import pytest
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, func, insert, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError

from fedge.coordinator import migrate
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.models import Assignment, Base, Device, Round, Task, Update
from fedge.coordinator.states import (
    AssignmentStatus,
    DeviceStatus,
    RoundStatus,
    TaskStatus,
    UpdateStatus,
)

BAD = "bogus"
STATUS_ENUMS: dict[str, type[StrEnum]] = {
    "tasks": TaskStatus,
    "rounds": RoundStatus,
    "devices": DeviceStatus,
    "assignments": AssignmentStatus,
    "updates": UpdateStatus,
}
MODELS: dict[str, Any] = {
    "tasks": Task,
    "rounds": Round,
    "devices": Device,
    "assignments": Assignment,
    "updates": Update,
}
#: A row for each table that is valid except, perhaps, its status. Parents are the rows of
#: :func:`_seed`; the free device ``dev-b`` keeps the unique (round, device) and
#: (device, idempotency key) pairs unused. Literal JSON and timestamps keep it portable.
RAW_INSERT = {
    "tasks": "INSERT INTO tasks (id, name, description, status, model_config, model_spec, "
    "aggregation, compression, training, current_version, created_at, updated_at) VALUES "
    "(900, 'raw', '', :status, '{}', '[]', '{}', '{}', '{}', -1, CURRENT_TIMESTAMP, "
    "CURRENT_TIMESTAMP)",
    "rounds": "INSERT INTO rounds (id, task_id, number, base_version, status, target_updates, "
    "opened_at, num_assigned, num_received, num_stale, num_dropped, num_rejected, metrics) "
    "VALUES (900, :task_id, 900, 0, :status, 0, CURRENT_TIMESTAMP, 0, 0, 0, 0, 0, '{}')",
    "devices": "INSERT INTO devices (id, name, public_key, status, capabilities, enrolled_at, "
    "num_assigned, num_completed, num_dropped) VALUES "
    "('dev-raw', 'raw', 'raw-key', :status, '{}', CURRENT_TIMESTAMP, 0, 0, 0)",
    "assignments": "INSERT INTO assignments (id, task_id, round_id, device_id, base_version, "
    "status, assigned_at, metrics) VALUES "
    "(900, :task_id, :round_id, 'dev-b', 0, :status, CURRENT_TIMESTAMP, '{}')",
    "updates": "INSERT INTO updates (id, task_id, device_id, base_version, num_examples, "
    "blob_digest, byte_size, staleness, weight, status, idempotency_key, received_at, metrics) "
    "VALUES (900, :task_id, 'dev-b', 0, 1, 'x', 1, 0, 1.0, :status, 'raw', CURRENT_TIMESTAMP, "
    "'{}')",
}
TABLES = list(STATUS_ENUMS)


@dataclass
class Seeded:
    """Ids of one valid row per table."""

    ids: dict[str, Any]

    def params(self) -> dict[str, Any]:
        return {"task_id": self.ids["tasks"], "round_id": self.ids["rounds"]}


def _seed(engine: Engine) -> Seeded:
    """One row per table with a status. Core inserts naming their columns, so that the rows
    fit the schema of an earlier revision too (the models have columns later migrations add)."""
    now = utcnow()
    with session_scope(make_sessionmaker(engine)) as session:

        def add(model: Any, **values: Any) -> Any:
            table = model.__table__
            return session.execute(
                insert(table).values(**values).returning(table.c.id)
            ).scalar_one()

        task_id = add(
            Task,
            name="t",
            model_config={},
            model_spec=[],
            aggregation={},
            compression={},
            training={},
            status=TaskStatus.RUNNING,
            created_at=now,
            updated_at=now,
        )
        for key in ("a", "b"):
            add(Device, id=f"dev-{key}", name=key, public_key=f"key-{key}", enrolled_at=now)
        round_id = add(
            Round,
            task_id=task_id,
            number=1,
            base_version=0,
            opened_at=now,
            deadline_at=now + timedelta(1),
        )
        assignment_id = add(
            Assignment,
            task_id=task_id,
            round_id=round_id,
            device_id="dev-a",
            base_version=0,
            assigned_at=now,
        )
        update_id = add(
            Update,
            task_id=task_id,
            assignment_id=assignment_id,
            device_id="dev-a",
            round_id=round_id,
            base_version=0,
            num_examples=1,
            blob_digest="x",
            byte_size=1,
            staleness=0,
            weight=1.0,
            idempotency_key="k",
            received_at=now,
            metrics={},
        )
        return Seeded(
            {
                "tasks": task_id,
                "rounds": round_id,
                "devices": "dev-a",
                "assignments": assignment_id,
                "updates": update_id,
            }
        )


#: The rows of :func:`_seed` in SQL that names only the columns of the schema the migration
#: test starts from (0002): columns later migrations add to the models do not matter here.
SEED_SQL = (
    "INSERT INTO tasks (id, name, description, status, model_config, model_spec, aggregation, "
    "compression, training, current_version, created_at, updated_at) VALUES (1, 't', '', "
    "'running', '{}', '[]', '{}', '{}', '{}', -1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
    "INSERT INTO devices (id, name, public_key, status, capabilities, enrolled_at, "
    "num_assigned, num_completed, num_dropped) VALUES ('dev-a', 'a', 'key-a', 'active', '{}', "
    "CURRENT_TIMESTAMP, 0, 0, 0), ('dev-b', 'b', 'key-b', 'active', '{}', CURRENT_TIMESTAMP, "
    "0, 0, 0)",
    "INSERT INTO rounds (id, task_id, number, base_version, status, target_updates, opened_at, "
    "num_assigned, num_received, num_stale, num_dropped, num_rejected, metrics) VALUES "
    "(1, 1, 1, 0, 'open', 0, CURRENT_TIMESTAMP, 0, 0, 0, 0, 0, '{}')",
    "INSERT INTO assignments (id, task_id, round_id, device_id, base_version, status, "
    "assigned_at, metrics) VALUES (1, 1, 1, 'dev-a', 0, 'assigned', CURRENT_TIMESTAMP, '{}')",
    "INSERT INTO updates (id, task_id, assignment_id, device_id, round_id, base_version, "
    "num_examples, blob_digest, byte_size, staleness, weight, status, idempotency_key, "
    "received_at, metrics) VALUES (1, 1, 1, 'dev-a', 1, 0, 1, 'x', 1, 0, 1.0, 'accepted', 'k', "
    "CURRENT_TIMESTAMP, '{}')",
)


def _seed_sql(engine: Engine) -> Seeded:
    with engine.begin() as conn:
        for statement in SEED_SQL:
            conn.execute(text(statement))
    return Seeded({"tasks": 1, "rounds": 1, "devices": "dev-a", "assignments": 1, "updates": 1})


@pytest.fixture
def seeded(engine: Engine) -> Seeded:
    return _seed(engine)


def _raw_status(engine: Engine, table: str, row_id: Any) -> str:
    with engine.connect() as conn:
        value = conn.execute(
            text(f"SELECT status FROM {table} WHERE id = :id"), {"id": row_id}
        ).scalar_one()
    assert type(value) is str
    return value


def _assert_check_violation(exc: IntegrityError, table: str) -> None:
    """The error is the status CHECK (PostgreSQL names the constraint; SQLite names it too,
    or quotes its expression), not some other constraint."""
    message = str(exc.orig)
    assert f"ck_{table}_status" in message or "status IN" in message, message
    assert "CHECK" in message.upper(), message


# ------------------------------------------------------------------------ the database


@pytest.mark.parametrize("table", TABLES)
def test_the_database_refuses_an_unknown_status_on_insert(
    engine: Engine, seeded: Seeded, table: str
) -> None:
    with pytest.raises(IntegrityError) as refused, engine.begin() as conn:
        conn.execute(text(RAW_INSERT[table]), {**seeded.params(), "status": BAD})
    _assert_check_violation(refused.value, table)
    # The same row with a status of the enum goes in: the status was the only fault.
    valid = next(iter(STATUS_ENUMS[table])).value
    with engine.begin() as conn:
        conn.execute(text(RAW_INSERT[table]), {**seeded.params(), "status": valid})
    with engine.connect() as conn:
        count = conn.execute(text(f"SELECT count(*) FROM {table} WHERE status = :s"), {"s": BAD})
        assert count.scalar_one() == 0


@pytest.mark.parametrize("table", TABLES)
def test_the_database_refuses_an_unknown_status_on_update(
    engine: Engine, seeded: Seeded, table: str
) -> None:
    row_id = seeded.ids[table]
    before = _raw_status(engine, table, row_id)
    for bad in (BAD, before.upper(), ""):
        with pytest.raises(IntegrityError) as refused, engine.begin() as conn:
            conn.execute(
                text(f"UPDATE {table} SET status = :status WHERE id = :id"),
                {"status": bad, "id": row_id},
            )
        _assert_check_violation(refused.value, table)
    assert _raw_status(engine, table, row_id) == before
    # Every member is allowed.
    for member in STATUS_ENUMS[table]:
        with engine.begin() as conn:
            conn.execute(
                text(f"UPDATE {table} SET status = :status WHERE id = :id"),
                {"status": member.value, "id": row_id},
            )
        assert _raw_status(engine, table, row_id) == member.value


def test_every_status_column_has_its_check_with_exactly_the_enum_values(engine: Engine) -> None:
    """The migrated database's constraints list the enums' values, neither more nor fewer
    (autogenerate does not compare CHECK constraints, so this is the drift check)."""
    inspector = inspect(engine)
    for table, enum in STATUS_ENUMS.items():
        checks = {c["name"]: c["sqltext"] for c in inspector.get_check_constraints(table)}
        assert f"ck_{table}_status" in checks, checks
        values = set(re.findall(r"'([^']*)'", checks[f"ck_{table}_status"]))
        assert values == {m.value for m in enum}, (table, checks)
        model_checks = [
            c.name
            for c in Base.metadata.tables[table].constraints
            if c.name == f"ck_{table}_status"
        ]
        assert model_checks == [f"ck_{table}_status"]


# ------------------------------------------------------------------------------ the ORM


@pytest.fixture
def statements(engine: Engine) -> list[tuple[str, Any]]:
    """Every statement and its parameters as sent to the database driver."""
    sent: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    return sent


def _sent_bad(statements: list[tuple[str, Any]]) -> bool:
    return any(BAD in statement or BAD in repr(parameters) for statement, parameters in statements)


@pytest.mark.parametrize("table", TABLES)
def test_the_orm_refuses_an_unknown_status_before_the_database(
    engine: Engine, seeded: Seeded, statements: list[tuple[str, Any]], table: str
) -> None:
    model = MODELS[table]
    row_id = seeded.ids[table]
    sessions = make_sessionmaker(engine)
    before = _raw_status(engine, table, row_id)

    with pytest.raises(StatementError) as refused, session_scope(sessions) as session:
        obj = session.get(model, row_id)
        assert obj is not None
        obj.status = BAD
    assert not isinstance(refused.value, DBAPIError)  # not the database's refusal
    assert isinstance(refused.value.orig, ValueError)

    with pytest.raises(StatementError) as refused, session_scope(sessions) as session:
        session.execute(update(model).where(model.id == row_id).values(status=BAD))
    assert not isinstance(refused.value, DBAPIError)

    with pytest.raises(StatementError), session_scope(sessions) as session:
        session.scalar(select(func.count()).where(model.status == BAD))

    assert not _sent_bad(statements)
    assert _raw_status(engine, table, row_id) == before


@pytest.mark.parametrize("table", TABLES)
def test_the_orm_reads_members_and_writes_their_strings(
    engine: Engine, seeded: Seeded, table: str
) -> None:
    model = MODELS[table]
    enum = STATUS_ENUMS[table]
    row_id = seeded.ids[table]
    sessions = make_sessionmaker(engine)
    last = list(enum)[-1]
    with session_scope(sessions) as session:
        obj = session.get(model, row_id)
        assert obj is not None
        assert type(obj.status) is enum
        obj.status = last.value  # a plain string of a member is accepted
    assert _raw_status(engine, table, row_id) == last.value
    with session_scope(sessions) as session:
        assert (
            session.scalar(select(func.count()).select_from(model).where(model.status == last)) == 1
        )


# ---------------------------------------------------------------------------- migration


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _counts(engine: Engine) -> dict[str, int]:
    """Rows per table, of the tables the database has at its revision (later migrations add
    tables of their own)."""
    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
        return {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
            for t in Base.metadata.tables
            if t in present
        }


def test_migration_0003_keeps_rows_and_its_downgrade_drops_the_checks(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url, "0002")
    engine = make_engine(empty_db_url)
    try:
        seeded = _seed_sql(engine)
        before = _counts(engine)
        assert before["updates"] == before["assignments"] == 1

        # SQLite rebuilds every table: no cascade empties the children of a rebuilt parent.
        migrate.upgrade(empty_db_url, "0003")
        assert _revision(empty_db_url) == "0003"
        assert _counts(engine) == before
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(RAW_INSERT["updates"]), {**seeded.params(), "status": BAD})

        migrate.downgrade(empty_db_url, "0002")
        assert _revision(empty_db_url) == "0002"
        assert _counts(engine) == before
        for table in TABLES:
            assert not [
                c
                for c in inspect(engine).get_check_constraints(table)
                if "status" in (c["name"] or "")
            ]
        with engine.begin() as conn:  # no constraint any more
            conn.execute(text(RAW_INSERT["updates"]), {**seeded.params(), "status": BAD})

        # A database holding a value outside the enums cannot be upgraded; nothing changes.
        with pytest.raises(IntegrityError):
            migrate.upgrade(empty_db_url, "0003")
        assert _revision(empty_db_url) == "0002"
        assert _counts(engine) == {**before, "updates": before["updates"] + 1}
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM updates WHERE status = :s"), {"s": BAD})
        migrate.upgrade(empty_db_url, "0003")
        assert _revision(empty_db_url) == "0003"
        assert _counts(engine) == before
    finally:
        engine.dispose()
