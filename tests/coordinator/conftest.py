"""A real coordinator over HTTPS on loopback, on each database backend."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine

from fedge.coordinator.app import create_app
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.secrets import create_api_key
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths, create_ca_and_server_cert
from tests.support import databases
from tests.support.rounds import Db
from tests.support.servers import serve_in_thread


@pytest.fixture(scope="session")
def tls_paths(tmp_path_factory: pytest.TempPathFactory) -> TlsPaths:
    return create_ca_and_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    session_db: databases.PostgresDatabase = request.getfixturevalue("postgres_db")
    db = databases.PostgresDatabase(session_db.admin_url.render_as_string(hide_password=False))
    db.create()
    try:
        yield db.url
    finally:
        db.drop()


@pytest.fixture
def settings(db_url: str, tmp_path: Path, tls_paths: TlsPaths) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        scheduler_interval_s=0.05,
        long_poll_recheck_s=0.2,
    )


def make_key(settings: Settings, role: str) -> str:
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            _, secret = create_api_key(session, name=f"test {role}", role=role)
    finally:
        engine.dispose()
    return secret


@dataclass
class Coordinator:
    """A running coordinator and what tests need to talk to it."""

    url: str
    settings: Settings
    app: FastAPI
    ca_file: Path
    admin_key: str
    viewer_key: str

    def client(self, key: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            headers=headers,
            timeout=30,
            **kwargs,
        )

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def viewer(self) -> httpx.Client:
        return self.client(self.viewer_key)


@pytest.fixture
def coordinator(settings: Settings, tls_paths: TlsPaths) -> Iterator[Coordinator]:
    app = create_app(settings)
    admin_key = make_key(settings, "admin")
    viewer_key = make_key(settings, "viewer")
    with serve_in_thread(app, certfile=settings.tls_cert, keyfile=settings.tls_key) as url:
        yield Coordinator(url, settings, app, tls_paths.ca_cert, admin_key, viewer_key)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on the test's migrated database, disposed afterwards."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db(settings: Settings) -> Iterator[Db]:
    """Read access to the test's database and blob store (the coordinator's, when one runs)."""
    handle = Db(settings)
    yield handle
    handle.close()


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The coordinator's runtime on the test settings (engine tests without a server)."""
    rt = Runtime.open(settings)
    try:
        yield rt
    finally:
        rt.close()
