"""Fixtures shared by every test package: databases on SQLite and PostgreSQL, settings, a
real HTTPS coordinator on loopback, and HTTP clients for administrators."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from absl import logging as absl_logging

from tests.support import databases

# dp-accounting (the coordinator's privacy accountant) imports absl, whose logging handler keeps
# the sys.stderr of its import time -- under pytest, pytest's capture file -- and closes it when
# logging is reconfigured, which every uvicorn server a test starts does. The handler is on no
# logger; pointed at the process's own stderr it closes nothing of pytest's.
absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> databases.SqliteTemplate:
    return databases.SqliteTemplate(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[databases.PostgresDatabase]:
    url = databases.postgres_admin_url()
    if url is None:
        if databases.in_ci():
            pytest.fail(f"CI=true but {databases.ENV} is not set: the PostgreSQL leg must run")
        pytest.skip(f"{databases.ENV} is not set; skipping the PostgreSQL leg")
    try:
        yield from databases.iter_postgres(url)
    except Exception as exc:
        if databases.in_ci():
            pytest.fail(f"PostgreSQL at {url} is unusable: {exc}")
        pytest.skip(f"PostgreSQL at {url} is unusable: {exc}")


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database; every database test runs once per backend."""
    yield from databases.fresh_database(request, request.param, tmp_path)


@pytest.fixture(autouse=True)
def _no_fedge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test, never from the developer's environment."""
    for name in list(os.environ):
        if name.startswith("FEDGE_") and name != databases.ENV:
            monkeypatch.delenv(name)
