"""Choosing the blob backend (FEDGE_BLOB_URL), and a coordinator that keeps its blobs in
PostgreSQL running a round through the real HTTPS API without writing a file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy import text

from fedge.coordinator.blobstore import FileBlobStore
from fedge.coordinator.blobstore_db import DatabaseBlobStore, TieredBlobStore, open_blob_store
from fedge.coordinator.cli import main as cli_main
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.shared.wire import decode_model
from tests.coordinator.conftest import Coordinator
from tests.support import databases
from tests.support.device import API
from tests.support.rounds import (
    Db,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
)

PG_URL = "postgresql+psycopg://fedge@db/fedge"


def test_unset_keeps_files_under_blob_dir_and_small_updates_in_the_database(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    store = open_blob_store(settings)  # no connection is made until it is used
    try:
        assert isinstance(store, TieredBlobStore)
        assert store.root == tmp_path / "blobs" and store.files.root == store.root
        assert store.inline_limit == settings.inline_update_max_bytes == 262_144
        assert store.rows.engine.url.render_as_string() == settings.database_url
        assert not settings.blobs_in_database
    finally:
        store.close()


def test_no_inline_limit_keeps_only_files(tmp_path: Path) -> None:
    store = open_blob_store(Settings(data_dir=tmp_path, inline_update_max_bytes=0))
    assert isinstance(store, FileBlobStore) and store.inline_limit == 0
    assert store.root == tmp_path / "blobs"


@pytest.mark.parametrize("form", ["file:{}", "file://{}"])
def test_file_urls_name_the_directory(tmp_path: Path, form: str) -> None:
    where = tmp_path / "elsewhere"
    settings = Settings(data_dir=tmp_path, blob_url=form.format(where))
    assert settings.blobs == where
    store = open_blob_store(settings)
    try:
        assert isinstance(store, TieredBlobStore) and store.root == where
    finally:
        store.close()


def test_database_uses_the_coordinators_own_database(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=PG_URL, blob_url="database")
    assert settings.blobs_in_database
    store = open_blob_store(settings)  # no connection is made until it is used
    try:
        assert isinstance(store, DatabaseBlobStore)
        assert store.engine.url.render_as_string(hide_password=False) == PG_URL
        assert store.inline_limit == settings.inline_update_max_bytes
    finally:
        store.close()
    assert not (tmp_path / "blobs").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"blob_url": "s3://bucket/blobs"}, "is not supported"),
        ({"blob_url": "postgresql+psycopg://x@y/z"}, "is not supported"),
        ({"blob_url": "Database"}, "is not supported"),
        ({"blob_url": "file:"}, "names no directory"),
        ({"blob_url": "file://host/blobs"}, "a host name is not supported"),
        ({"blob_url": "file:/a", "blob_dir": "/b"}, "name different blob stores"),
        ({"blob_url": "database"}, "needs a PostgreSQL database_url"),
    ],
)
def test_bad_blob_urls_are_refused(tmp_path: Path, settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]


def test_serve_refuses_a_bad_blob_url_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDGE_BLOB_URL", "s3://bucket")
    assert cli_main(["serve", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "invalid setting" in err and "blob_url 's3://bucket' is not supported" in err


# ------------------------------------------------------------------ end to end


@pytest.fixture
def settings(
    postgres_db: databases.PostgresDatabase, tmp_path: Path, tls_paths: TlsPaths
) -> Iterator[Settings]:
    """Overrides conftest's ``settings``: PostgreSQL with blobs in it."""
    postgres_db.truncate_all()
    try:
        yield Settings(
            data_dir=tmp_path / "data",
            database_url=postgres_db.url,
            blob_url="database",
            tls_cert=tls_paths.server_cert,
            tls_key=tls_paths.server_key,
            scheduler_interval_s=0.05,
            long_poll_recheck_s=0.2,
        )
    finally:
        postgres_db.truncate_all()


@pytest.mark.postgres
def test_a_round_with_blobs_in_postgresql_writes_no_file(
    coordinator: Coordinator, db: Db, tmp_path: Path
) -> None:
    blobs = DatabaseBlobStore(coordinator.settings.database_url)
    try:
        with coordinator.client() as client:
            assert client.get("/readyz").json() == {"status": "ready"}
        with fleet_of(coordinator, 2) as fleet:
            task_id = create_task(
                coordinator,
                aggregation=every_device(2, deadline_s=60.0),
            )
            rng = np.random.default_rng(3)
            bodies = []
            for device in fleet:
                work = device.work(wait=10)
                assert work is not None and work["base_version"] == 0
                body = make_update(
                    work, delta=random_delta(spec_of(work), rng), num_examples=10, rng=rng
                )
                assert device.upload(work, body).status_code == 201
                bodies.append(body)
            db.wait_task(task_id, lambda t: t.current_version == 1)
        updates = db.updates(task_id)
        assert sorted(blobs.get(u.blob_digest) for u in updates) == sorted(bodies)
        v1 = db.version(task_id, 1)
        assert v1 is not None
        with coordinator.admin() as admin:
            download = admin.get(f"{API}/tasks/{task_id}/models/1")
            assert download.status_code == 200
            assert download.content == blobs.get(v1.blob_digest)
            assert set(decode_model(download.content)) == {"W", "b"}
            assert admin.get("/readyz").json() == {"status": "ready"}
            # A chunk lost behind the store's back: a clear 503, never a short model.
            with blobs.engine.begin() as conn:
                conn.execute(
                    text("DELETE FROM blob_chunks WHERE digest = :d"), {"d": v1.blob_digest}
                )
            damaged = admin.get(f"{API}/tasks/{task_id}/models/1")
            assert damaged.status_code == 503, damaged.text
            assert damaged.json()["error"] == "blob_damaged"
            assert v1.blob_digest in damaged.json()["detail"]
    finally:
        blobs.close()
    data_dir = coordinator.settings.data_dir
    assert not coordinator.settings.blobs.exists()
    assert not data_dir.exists() or [p for p in data_dir.rglob("*") if p.is_file()] == []
