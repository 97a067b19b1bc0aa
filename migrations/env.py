"""Alembic environment. The database URL comes from the caller's config (set by
``fedge.coordinator.migrate``) or, failing that, from the coordinator's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from fedge.coordinator.db import make_engine
from fedge.coordinator.models import Base
from fedge.coordinator.settings import Settings

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_foreign_keys(connection: Connection, *, on: bool) -> None:
    """Switch SQLite's foreign-key enforcement. Only outside a transaction does the pragma
    take effect, hence the driver connection rather than ``connection.execute`` (which would
    begin one)."""
    connection.connection.driver_connection.execute(  # type: ignore[union-attr]
        f"PRAGMA foreign_keys={'ON' if on else 'OFF'}"
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            # Batch mode rebuilds SQLite tables (copy, drop, rename); with enforcement on,
            # dropping a referenced table would cascade into its children. Migrations that
            # rebuild check the references themselves (PRAGMA foreign_key_check).
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                _sqlite_foreign_keys(conn, on=False)
            try:
                _run(conn)
            finally:
                if sqlite:
                    _sqlite_foreign_keys(conn, on=True)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
