"""Run Alembic migrations programmatically and report whether a database is at head."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

import fedge.migrations


def alembic_config(url: str) -> Config:
    cfg = Config()
    # __path__, not __file__: a stale editable install may see a namespace package.
    cfg.set_main_option("script_location", next(iter(fedge.migrations.__path__)))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision(url: str = "sqlite://") -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def schema_status(engine: Engine) -> tuple[bool, str]:
    """(ready, detail): the database answers and its schema is at the Alembic head."""
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        return False, f"database unreachable: {exc.__class__.__name__}"
    head = head_revision(str(engine.url))
    if current != head:
        return False, f"schema at {current or 'nothing'}, expected {head}; run migrations"
    return True, "ready"
