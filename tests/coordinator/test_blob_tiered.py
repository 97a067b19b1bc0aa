"""The tiered blob store (files, and small blobs as rows of the coordinator's database written
in the caller's transaction) on SQLite and PostgreSQL; and uploads whose bodies are stored in
the upload's own transaction."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, select

from fedge.coordinator.blobstore import BlobNotFound, FileBlobStore
from fedge.coordinator.blobstore_db import DatabaseBlobStore, TieredBlobStore
from fedge.coordinator.db import write_connection
from fedge.coordinator.models import Blob
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.rounds import (
    Db,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
)

LIMIT = 4096


@pytest.fixture
def tiered(engine: Engine, tmp_path: Path) -> TieredBlobStore:
    return TieredBlobStore(
        FileBlobStore(tmp_path / "blobs"), DatabaseBlobStore(engine=engine, inline_limit=LIMIT)
    )


def rows_of(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(select(Blob.digest)))


def test_a_blob_put_in_a_transaction_is_stored_with_its_commit(
    tiered: TieredBlobStore, engine: Engine
) -> None:
    data = b"update body" * 10
    with write_connection(engine) as conn:
        digest = tiered.put_in(conn, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert tiered.get(digest) == data
    assert tiered.exists(digest) and tiered.size(digest) == len(data) and tiered.verify(digest)
    assert rows_of(engine) == [digest]
    assert not tiered.files.exists(digest)  # no file: the rows are the only copy
    assert [info.digest for info in tiered.list_blobs()] == [digest]


def test_a_rolled_back_transaction_leaves_no_blob(tiered: TieredBlobStore, engine: Engine) -> None:
    data = b"refused body"
    with pytest.raises(RuntimeError, match="refused"), write_connection(engine) as conn:
        digest = tiered.put_in(conn, data)
        raise RuntimeError("refused")
    assert rows_of(engine) == []
    assert not tiered.exists(digest)
    with pytest.raises(BlobNotFound):
        tiered.get(digest)
    assert list(tiered.list_blobs()) == []


def test_the_same_bytes_again_refresh_the_write_time(
    tiered: TieredBlobStore, engine: Engine
) -> None:
    data = b"x" * 100
    with write_connection(engine) as conn:
        digest = tiered.put_in(conn, data)
    first = next(iter(tiered.list_blobs())).written_at
    assert not tiered.delete_if_older(digest, first)  # written at the cutoff: kept
    time.sleep(0.01)  # the write time's resolution; nothing to await
    with write_connection(engine) as conn:
        assert tiered.put_in(conn, data) == digest
    again = next(iter(tiered.list_blobs()))
    assert again.written_at > first and again.digest == digest
    assert rows_of(engine) == [digest] and tiered.get(digest) == data


def test_a_blob_above_the_limit_is_refused(tiered: TieredBlobStore, engine: Engine) -> None:
    with (
        pytest.raises(ValueError, match=f"4097 bytes is above the inline limit {LIMIT}"),
        write_connection(engine) as conn,
    ):
        tiered.put_in(conn, bytes(LIMIT + 1))
    assert rows_of(engine) == []


def test_files_and_rows_are_read_listed_and_deleted_together(
    tiered: TieredBlobStore, engine: Engine
) -> None:
    in_file = tiered.put(b"a model")
    with write_connection(engine) as conn:
        in_rows = tiered.put_in(conn, b"an update")
        both = tiered.put_in(conn, b"both ways")
    assert tiered.put(b"both ways") == both
    assert tiered.files.exists(in_file) and not tiered.rows.exists(in_file)
    assert tiered.rows.exists(in_rows) and not tiered.files.exists(in_rows)
    assert tiered.get(in_file) == b"a model" and tiered.get(in_rows) == b"an update"
    assert tiered.size(in_file) == 7 and tiered.size(in_rows) == 9
    assert tiered.verify(in_file) and tiered.verify(in_rows)
    assert sorted(info.digest for info in tiered.list_blobs()) == sorted(
        [in_file, in_rows, both, both]
    )
    now = time.time() + 1
    assert tiered.delete_if_older(both, now)
    assert not tiered.files.exists(both) and not tiered.rows.exists(both)
    assert tiered.delete(in_rows) and not tiered.exists(in_rows)
    assert not tiered.delete(in_rows)
    assert not tiered.delete_if_older(in_file, 0.0)  # written after the cutoff: kept
    assert tiered.delete_if_older(in_file, now)
    assert list(tiered.list_blobs()) == []
    with pytest.raises(BlobNotFound):
        tiered.size(in_file)


def test_check_reports_the_file_store_first(tiered: TieredBlobStore, tmp_path: Path) -> None:
    assert tiered.check() == (True, "ok")
    (tmp_path / "blobs").rmdir()
    ok, detail = tiered.check()
    assert not ok and "does not exist" in detail


# ------------------------------------------------------------------ uploads


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """An update of the test model is about 90 bytes, with 20 metrics about 240: the limit
    sits between the two bodies of the test below."""
    return settings.model_copy(update={"inline_update_max_bytes": 160})


def test_small_update_bodies_commit_with_their_rows_and_larger_ones_go_to_files(
    coordinator: Coordinator, db: Db
) -> None:
    assert coordinator.settings.inline_update_max_bytes == 160
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(coordinator, aggregation=every_device(2, deadline_s=60.0))
        rng = np.random.default_rng(11)
        bodies: list[bytes] = []
        many = {f"m{i}": float(i) for i in range(20)}
        for device, metrics in zip(fleet, (None, many), strict=True):
            work = device.work(wait=10)
            assert work is not None
            delta = random_delta(spec_of(work), rng)
            body = make_update(work, delta=delta, num_examples=10, rng=rng, metrics=metrics)
            assert device.upload(work, body).status_code == 201
            bodies.append(body)
        db.wait_task(task_id, lambda t: t.current_version == 1)
    small, large = sorted(bodies, key=len)
    assert len(small) <= 160 < len(large), (len(small), len(large))
    blobs = db.blobs
    assert isinstance(blobs, TieredBlobStore)
    digests = {u.blob_digest for u in db.updates(task_id)}
    assert digests == {hashlib.sha256(b).hexdigest() for b in bodies}
    small_digest, large_digest = (hashlib.sha256(b).hexdigest() for b in (small, large))
    assert blobs.rows.exists(small_digest) and not blobs.files.exists(small_digest)
    assert blobs.files.exists(large_digest) and not blobs.rows.exists(large_digest)
    assert blobs.get(small_digest) == small and blobs.get(large_digest) == large
    with db.engine.connect() as conn:  # nothing but the small body is a row
        assert conn.scalar(select(func.count()).select_from(Blob)) == 1
