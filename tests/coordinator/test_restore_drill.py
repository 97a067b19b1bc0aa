"""Restore drill: back a coordinator up as docs/deploy.md says, restore it into a fresh
database and blob directory, and the task carries on from the same model version.

On each backend:

1. A coordinator process (``fedge coordinator serve``, HTTPS) runs a sync task with three
   signed devices until versions 1 and 2 exist; round 3 is then open on version 2 with one of
   its three updates accepted.
2. The coordinator stops (SIGTERM). The blob store is archived with ``tar`` first, then the
   database is dumped (``pg_dump --format=custom``, or SQLite's online backup API). The
   originals are deleted, so nothing can be read from them afterwards.
3. The dump is restored into a fresh database (with ``pg_restore`` into an empty PostgreSQL
   database, or into one a new deployment has just migrated; a new SQLite file) and the
   archive into a fresh directory; ``fedge coordinator migrate --status`` finds the schema at
   head.
4. A new coordinator process serves the restored state: ``/readyz`` is 200, the old admin key
   works, the task, its rounds, devices and model versions read back exactly as before, the
   latest model has the same bytes and ETag (a device's cached ETag still gets 304), and
   every blob hashes to its name.
5. The same device identities finish round 3 on the restored coordinator: version 3 is the
   restored version 2 plus the weighted mean of all three updates (including the one accepted
   before the backup), and round 4 produces version 4 on top of it, completing the task.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import make_url

from fedge.coordinator.blobstore import FileBlobStore
from fedge.coordinator.migrate import upgrade
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.shared.modelspec import Weights
from fedge.shared.wire import decode_model
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support import databases
from tests.support.backup import (
    archive_blobs,
    corrupt_blobs,
    dump_database,
    extract_blobs,
    require_tools,
    restore_database,
)
from tests.support.device import API
from tests.support.process import CoordinatorProcess, coordinator_process
from tests.support.rounds import (
    Db,
    Fleet,
    TestDevice,
    create_task,
    decoded_delta,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

AGGREGATION = {
    "clients_per_round": 3,
    "over_selection": 0.0,
    "min_updates": 3,
    # Rounds close when all three devices have uploaded. The deadline decides nothing here,
    # so it is far off: round 3 must still be open after the coordinator was down.
    "round_deadline_s": 600,
    "num_rounds": 4,
}
#: How long one round may take on a busy machine (polled, never slept).
ROUND_TIMEOUT_S = 30.0


@dataclass
class Databases:
    """A migrated source database and a restore target without data (empty, or only
    migrated), both thrown away after."""

    source: str
    target: str
    drop_source: Callable[[], None]


def _postgres_admin_url() -> str:
    url = databases.postgres_admin_url()
    if url is None:
        if databases.in_ci():
            pytest.fail(f"CI=true but {databases.ENV} is not set: the PostgreSQL leg must run")
        pytest.skip(f"{databases.ENV} is not set; skipping the PostgreSQL leg")
    return url


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        # What docs/deploy.md describes: the new deployment's coordinator already migrated
        # its (empty) database, and pg_restore --clean --if-exists replaces that schema.
        pytest.param("postgres-over-migrated", marks=pytest.mark.postgres),
    ]
)
def dbs(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: databases.SqliteTemplate
) -> Iterator[Databases]:
    if request.param == "sqlite":
        (tmp_path / "source").mkdir()
        target = tmp_path / "restored" / "fedge.db"
        source_url = sqlite_template.fresh(tmp_path / "source")
        source_file = Path(make_url(source_url).database or "")
        yield Databases(source_url, f"sqlite:///{target}", source_file.unlink)
        return
    admin_url = _postgres_admin_url()
    require_tools("pg_dump", "pg_restore")
    source, target_db = databases.PostgresDatabase(admin_url), databases.PostgresDatabase(admin_url)
    try:
        source.create()
        upgrade(source.url)
        target_db.create()  # empty: no schema, no alembic_version
        if request.param == "postgres-over-migrated":
            upgrade(target_db.url)
        yield Databases(source.url, target_db.url, source.drop)
    finally:
        source.drop()
        target_db.drop()


def _settings(data_dir: Path, database_url: str, tls: TlsPaths) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
    )


@dataclass
class Contribution:
    """One device's update for one assignment, and what the coordinator will decode."""

    device_id: str
    work: dict[str, Any]
    body: bytes
    delta: Weights
    num_examples: int


def take_work(fleet: Fleet, *, base_version: int, rng: np.random.Generator) -> list[Contribution]:
    """Every device long-polls for its assignment on ``base_version`` and prepares an update."""
    contributions = []
    for i, device in enumerate(fleet):
        work = device.work(wait=ROUND_TIMEOUT_S)
        assert work is not None, f"device {device.device_id} got no work"
        assert work["base_version"] == base_version
        spec = spec_of(work)
        num_examples = 10 * (i + 1)
        body = make_update(work, delta=random_delta(spec, rng), num_examples=num_examples)
        contributions.append(
            Contribution(device.device_id, work, body, decoded_delta(body, spec), num_examples)
        )
    return contributions


def upload(fleet: Fleet, contribution: Contribution) -> None:
    device = fleet.by_id(contribution.device_id)
    r = device.upload(contribution.work, contribution.body)
    assert r.status_code == 201, r.text


def wait_for_version(db: Db, task_id: int, version: int) -> None:
    wait_until(lambda: db.task(task_id).current_version >= version, timeout=ROUND_TIMEOUT_S)
    assert db.task(task_id).current_version == version


def aggregate_of(base: Weights, contributions: list[Contribution]) -> Weights:
    return expected_model(
        base, [c.delta for c in contributions], [c.num_examples for c in contributions]
    )


def snapshot(proc: CoordinatorProcess, key: str, task_id: int) -> dict[str, Any]:
    """What an administrator sees of the task, read through the API with ``key``."""
    with proc.client(key) as admin:
        views = {
            "task": admin.get(f"{API}/tasks/{task_id}"),
            "rounds": admin.get(f"{API}/tasks/{task_id}/rounds"),
            "versions": admin.get(f"{API}/tasks/{task_id}/models"),
            "devices": admin.get(f"{API}/devices"),
        }
        latest = admin.get(f"{API}/tasks/{task_id}/models/latest")
    for name, r in views.items():
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
    assert latest.status_code == 200, latest.text
    return {
        **{name: r.json() for name, r in views.items()},
        "latest": (latest.content, latest.headers["ETag"]),
    }


def rebind(fleet: Fleet, proc: CoordinatorProcess) -> Fleet:
    """The same device identities (keys, ids) with new HTTPS clients for ``proc``."""
    return Fleet(
        TestDevice(proc.url, proc.ca_file, key=d.key, device_id=d.device_id) for d in fleet
    )


def schema_status(settings: Settings) -> subprocess.CompletedProcess[str]:
    """``fedge coordinator migrate --status`` on ``settings``' database."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.shared.cli",
            "coordinator",
            "migrate",
            "--status",
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.database_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("ci", "outcome", "message"),
    [
        ("", pytest.skip.Exception, "fedge-no-such-tool not on PATH"),
        ("true", pytest.fail.Exception, "CI=true but fedge-no-such-tool not on PATH"),
    ],
)
def test_missing_backup_tools_skip_the_leg_but_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException], message: str
) -> None:
    monkeypatch.setenv("CI", ci)
    # Both outcomes are caught, so a skip where a failure is due fails this test.
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception)) as raised:
        require_tools("tar", "fedge-no-such-tool")
    assert type(raised.value) is outcome
    assert str(raised.value).startswith(message)
    require_tools("tar")  # present: nothing happens


@pytest.mark.slow
def test_restored_backup_continues_the_task_from_the_same_version(
    dbs: Databases, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    source = _settings(tmp_path / "source", dbs.source, tls_paths)
    restored = _settings(tmp_path / "restored", dbs.target, tls_paths)
    backup = tmp_path / "backup"
    backup.mkdir()
    rng = np.random.default_rng(6)

    # 1. Rounds 1 and 2 complete; round 3 is open with one accepted update.
    with coordinator_process(source, tmp_path / "first", ca_file=tls_paths.ca_cert) as first:
        admin_key = first.admin_key
        fleet = Fleet.enroll(first, 3)
        try:
            task_id = create_task(first, aggregation=AGGREGATION)
            with closing(Db(source)) as db:
                for version in (0, 1):
                    for c in take_work(fleet, base_version=version, rng=rng):
                        upload(fleet, c)
                    wait_for_version(db, task_id, version + 1)
                round3 = take_work(fleet, base_version=2, rng=rng)
                cached = fleet.by_id(round3[0].device_id).get(round3[0].work["model_url"])
                assert cached.status_code == 200, cached.text
                upload(fleet, round3[0])
                # The round's counters follow uploads on the next scheduler tick.
                wait_until(lambda: getattr(db.round(task_id, 3), "num_received", 0) == 1)
            before = snapshot(first, admin_key, task_id)
        finally:
            fleet.close()  # no open connections for the graceful stop to wait on
        first.stop()
        assert first.process.returncode == 0, first.log()

    assert before["task"]["current_version"] == 2
    assert [v["version"] for v in before["versions"]["items"]] == [0, 1, 2]
    last = before["rounds"]["items"][-1]
    assert (last["number"], last["status"], last["num_received"]) == (3, "open", 1)
    assert cached.content == before["latest"][0]
    assert cached.headers["ETag"] == before["latest"][1]

    # 2. Back up as docs/deploy.md says (blobs first, then the database), then lose the
    #    originals: nothing below can read them.
    archive_blobs(source.blobs, backup / "fedge-blobs.tar.gz")
    dump_database(source.database_url, backup / "fedge.dump")
    dbs.drop_source()
    shutil.rmtree(source.data_dir)

    # 3. Restore into a fresh database and a fresh blob directory.
    restore_database(backup / "fedge.dump", restored.database_url)
    extract_blobs(backup / "fedge-blobs.tar.gz", restored.blobs)
    status = schema_status(restored)
    assert status.returncode == 0, status.stdout + status.stderr

    # 4. A new coordinator on the restored state shows exactly what the old one had.
    with (
        coordinator_process(restored, tmp_path / "second", ca_file=tls_paths.ca_cert) as second,
        closing(Db(restored)) as db,
    ):
        with second.client() as anonymous:
            ready = anonymous.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert snapshot(second, admin_key, task_id) == before
        assert corrupt_blobs(restored.blobs) == []
        store = FileBlobStore(restored.blobs)
        for version in (0, 1, 2):
            row = db.version(task_id, version)
            assert row is not None and store.verify(row.blob_digest), version
        # Update bodies up to inline_update_max_bytes are rows of the restored database.
        updates = db.updates(task_id)
        assert updates and all(db.blobs.verify(u.blob_digest) for u in updates)
        assert not any(store.exists(u.blob_digest) for u in updates)
        v2 = db.weights(task_id, 2)
        assert_weights_equal(v2, decode_model(before["latest"][0]))

        # 5. The same devices carry on: round 3 completes on the restored version 2 ...
        fleet = rebind(fleet, second)
        try:
            device = fleet.by_id(round3[0].device_id)
            r = device.get(
                round3[0].work["model_url"], headers={"If-None-Match": before["latest"][1]}
            )
            assert r.status_code == 304, r.text
            for c in round3[1:]:
                upload(fleet, c)
            wait_for_version(db, task_id, 3)
            assert_weights_equal(db.weights(task_id, 3), aggregate_of(v2, round3))
            round_3 = db.round(task_id, 3)
            assert round_3 is not None
            assert (round_3.base_version, round_3.result_version) == (2, 3)
            applied = [u for u in db.updates(task_id) if u.round_id == round_3.id]
            assert sorted(u.device_id for u in applied) == sorted(c.device_id for c in round3)
            assert all(u.status == "applied" and u.applied_version == 3 for u in applied)

            # ... and round 4 builds version 4 on it, which completes the task.
            round4 = take_work(fleet, base_version=3, rng=rng)
            for c in round4:
                upload(fleet, c)
            wait_for_version(db, task_id, 4)
            v3 = db.weights(task_id, 3)
            assert_weights_equal(db.weights(task_id, 4), aggregate_of(v3, round4))
            wait_until(lambda: db.task(task_id).status == "completed", timeout=ROUND_TIMEOUT_S)
        finally:
            fleet.close()
        second.stop()
        assert second.process.returncode == 0, second.log()
