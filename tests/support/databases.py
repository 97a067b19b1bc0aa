"""Test databases: a migrated SQLite file per test, and on PostgreSQL a fresh database per
session with every table truncated after each test.

The PostgreSQL leg runs when ``FEDGE_TEST_POSTGRES_URL`` is set (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Under ``CI=true`` a missing or
unreachable PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fedge.coordinator.migrate import upgrade
from fedge.coordinator.models import Base

ENV = "FEDGE_TEST_POSTGRES_URL"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def postgres_admin_url() -> str | None:
    return os.environ.get(ENV) or None


class PostgresDatabase:
    """A throwaway database on the server named by FEDGE_TEST_POSTGRES_URL."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.name = f"fedge_test_{secrets.token_hex(4)}"
        self.url = self.admin_url.set(database=self.name).render_as_string(hide_password=False)

    def create(self) -> None:
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        finally:
            admin.dispose()

    def drop(self) -> None:
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        finally:
            admin.dispose()

    def truncate_all(self) -> None:
        engine = create_engine(self.url)
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        finally:
            engine.dispose()


class SqliteTemplate:
    """Migrate once, copy the file for every test (a fresh database each time)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "template.db"
        upgrade(f"sqlite:///{self.path}")

    def fresh(self, directory: Path) -> str:
        target = directory / "fedge.db"
        shutil.copyfile(self.path, target)
        return f"sqlite:///{target}"


def fresh_database(request: Any, backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on ``backend`` (``"sqlite"``: a copy of the session's
    template; ``"postgres"``: the session's PostgreSQL database, emptied before and after);
    ``request`` is the pytest fixture request that provides those session fixtures."""
    if backend == "sqlite":
        template: SqliteTemplate = request.getfixturevalue("sqlite_template")
        yield template.fresh(tmp_path)
        return
    pg: PostgresDatabase = request.getfixturevalue("postgres_db")
    pg.truncate_all()
    try:
        yield pg.url
    finally:
        pg.truncate_all()


def iter_postgres(admin_url: str) -> Iterator[PostgresDatabase]:
    db = PostgresDatabase(admin_url)
    db.create()
    try:
        upgrade(db.url)
        yield db
    finally:
        db.drop()
