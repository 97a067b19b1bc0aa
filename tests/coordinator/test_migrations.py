"""Migrations are the only way the schema changes: they must build exactly the models' schema,
come apart again cleanly, and /readyz must notice a database that is not at head."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from fedge.coordinator import migrate
from fedge.coordinator.app import create_app
from fedge.coordinator.db import make_engine
from fedge.coordinator.models import Base
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.support.servers import serve_in_thread


def schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_matches_models_and_downgrade_removes_everything(empty_db_url: str) -> None:
    model_tables = set(Base.metadata.tables)
    assert table_names(empty_db_url) == set()

    migrate.upgrade(empty_db_url, "head")
    assert current_revision(empty_db_url) == migrate.head_revision()
    assert table_names(empty_db_url) == model_tables | {"alembic_version"}
    assert schema_diff(empty_db_url) == []

    migrate.downgrade(empty_db_url, "base")
    assert current_revision(empty_db_url) is None
    assert table_names(empty_db_url) - {"alembic_version"} == set()

    # Down and up again: the downgrade left nothing behind that trips the upgrade.
    migrate.upgrade(empty_db_url, "head")
    assert schema_diff(empty_db_url) == []


def test_autogenerate_sees_a_schema_drift(empty_db_url: str) -> None:
    """The comparison above can fail: a database missing a model's table is reported."""
    migrate.upgrade(empty_db_url, "head")
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            Base.metadata.tables["leases"].drop(conn)
    finally:
        engine.dispose()
    diff = schema_diff(empty_db_url)
    assert [(op[0], op[1].name) for op in diff if isinstance(op, tuple)] == [
        ("add_table", "leases")
    ]


def test_readyz_follows_the_schema_revision(empty_db_url: str, tls_paths: TlsPaths, tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=empty_db_url,
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        scheduler_enabled=False,
    )
    verify = ssl.create_default_context(cafile=str(tls_paths.ca_cert))
    app = create_app(settings)
    with (
        serve_in_thread(app, certfile=tls_paths.server_cert, keyfile=tls_paths.server_key) as url,
        httpx.Client(base_url=url, verify=verify, timeout=30) as client,
    ):
        empty = client.get("/readyz")
        assert empty.status_code == 503
        assert empty.json()["error"] == "not_ready"
        assert "schema at nothing" in empty.json()["detail"]

        migrate.upgrade(empty_db_url, "head")
        assert client.get("/readyz").status_code == 200
        assert client.get("/readyz").json() == {"status": "ready"}

        migrate.downgrade(empty_db_url, "base")
        behind = client.get("/readyz")
        assert behind.status_code == 503
        assert behind.json()["error"] == "not_ready"
        assert str(migrate.head_revision()) in behind.json()["detail"]
        assert client.get("/healthz").status_code == 200  # alive, just not ready

        migrate.upgrade(empty_db_url, "head")
        assert client.get("/readyz").status_code == 200


def test_readyz_when_the_database_is_unreachable(tls_paths: TlsPaths, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'no-such-dir' / 'fedge.db'}",
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        scheduler_enabled=False,
    )
    verify = ssl.create_default_context(cafile=str(tls_paths.ca_cert))
    with (
        serve_in_thread(
            create_app(settings), certfile=tls_paths.server_cert, keyfile=tls_paths.server_key
        ) as url,
        httpx.Client(base_url=url, verify=verify, timeout=30) as client,
    ):
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"] == "not_ready"
    assert "unreachable" in response.json()["detail"]
