"""Retention and garbage collection of blobs (fedge.coordinator.retention), on each database
backend with the real file blob store.

The property: whatever rows exist, a collection never deletes a blob that a kept row names,
keeps exactly the versions the policy keeps, and deletes every other blob written longer ago
than the grace period. A blob written before its row is committed survives a collection that
runs in between. Pruned versions answer 410 ``version_pruned`` through the real API, and a
device whose delta chain runs through a pruned version gets the full model.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from fedge.coordinator import migrate
from fedge.coordinator.app import create_app
from fedge.coordinator.blobstore import FileBlobStore
from fedge.coordinator.cli import main
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import leases
from fedge.coordinator.models import (
    Assignment,
    Device,
    ModelVersion,
    Round,
    Task,
    Update,
)
from fedge.coordinator.retention import LEASE_NAME, GcBusy, GcReport, collect_garbage
from fedge.coordinator.settings import Settings
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ROUND_ACTIVE,
    TASK_TERMINAL,
    AssignmentStatus,
    RoundStatus,
    TaskStatus,
    UpdateStatus,
)
from fedge.coordinator.tls import TlsPaths
from fedge.shared.broadcast import blob_kind, rebuild
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import decode_model
from fedge.shared.wirelayout import KIND_CHAIN, KIND_MODEL
from tests.coordinator.conftest import Coordinator, make_key
from tests.support.device import API
from tests.support.rounds import (
    EXACT,
    Db,
    TestDevice,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)
from tests.support.servers import serve_in_thread

GRACE_S = 3600.0
#: How long ago "old" blobs were written and old rows created: beyond the grace period.
OLD_S = 2 * GRACE_S


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No automatic collection unless a test asks for it."""
    return settings.model_copy(update={"gc_interval_s": 0.0})


@contextmanager
def serving(settings: Settings, tls_paths: TlsPaths) -> Iterator[Coordinator]:
    app = create_app(settings)
    admin, viewer = make_key(settings, "admin"), make_key(settings, "viewer")
    with serve_in_thread(app, certfile=settings.tls_cert, keyfile=settings.tls_key) as url:
        yield Coordinator(url, settings, app, tls_paths.ca_cert, admin, viewer)


def age(blobs: FileBlobStore, digest: str, seconds: float = OLD_S) -> None:
    """Make the blob look written ``seconds`` ago."""
    when = time.time() - seconds
    os.utime(blobs.path(digest), (when, when))


def collect(db: Db, *, default_keep: int = 0, grace_s: float = GRACE_S, **kw) -> GcReport:
    return collect_garbage(
        db.sessions, db.blobs, default_keep=default_keep, grace_s=grace_s, holder="test", **kw
    )


def stored(db: Db) -> set[str]:
    return {info.digest for info in db.blobs.list_blobs()}


def add_task(db: Db, *, keep: int | None, status: TaskStatus = TaskStatus.RUNNING) -> int:
    """A task row as the engine sees it (no model yet)."""
    with session_scope(db.sessions) as s:
        task = Task(
            name="t",
            model_config_={"spec": []},
            model_spec=[],
            aggregation={} if keep is None else {"keep_versions": keep},
            compression={},
            training={},
            status=status,
        )
        s.add(task)
        s.flush()
        return task.id


def add_versions(db: Db, task_id: int, count: int, *, rng: np.random.Generator) -> list[str]:
    """Versions 0..count-1 written long ago (blob and row); their digests."""
    digests = []
    with session_scope(db.sessions) as s:
        for version in range(count):
            digest = db.blobs.put(rng.bytes(100))
            age(db.blobs, digest)
            s.add(
                ModelVersion(
                    task_id=task_id,
                    version=version,
                    blob_digest=digest,
                    size_bytes=100,
                    created_at=utcnow() - timedelta(seconds=OLD_S),
                )
            )
            digests.append(digest)
        s.execute(update(Task).where(Task.id == task_id).values(current_version=count - 1))
    return digests


def pruned_versions(db: Db, task_id: int) -> list[int]:
    return db.read(
        lambda s: list(
            s.scalars(
                select(ModelVersion.version)
                .where(ModelVersion.task_id == task_id, ModelVersion.pruned_at.is_not(None))
                .order_by(ModelVersion.version)
            )
        )
    )


# ------------------------------------------------------------- the property, on random rows


@dataclass
class World:
    """Random rows and blobs, and what the policy must keep (computed here, independently)."""

    kept_versions: set[tuple[int, int]] = field(default_factory=set)
    all_versions: dict[tuple[int, int], str] = field(default_factory=dict)
    must_keep: set[str] = field(default_factory=set)
    young_garbage: set[str] = field(default_factory=set)
    old_garbage: set[str] = field(default_factory=set)


def build_world(
    db: Db, rng: np.random.Generator, task_ids: list[int], device_ids: list[str], default_keep: int
) -> World:
    world = World()
    pool: list[bytes] = []  # bytes already stored: reused now and then (content addressing)
    past = utcnow() - timedelta(seconds=OLD_S)

    def blob() -> str:
        if pool and rng.random() < 0.15:
            data = pool[int(rng.integers(len(pool)))]
        else:
            data = rng.bytes(int(rng.integers(16, 200)))
            pool.append(data)
        digest = db.blobs.put(data)
        age(db.blobs, digest)
        return digest

    for task_id in task_ids:
        keep = [None, 0, 1, 2, 3][int(rng.integers(5))]
        status = list(TaskStatus)[int(rng.integers(len(TaskStatus)))]
        current = int(rng.integers(0, 9))
        with session_scope(db.sessions) as s:
            task = s.get(Task, task_id)
            assert task is not None
            task.status = status
            task.aggregation = {**task.aggregation, "keep_versions": keep}
            task.current_version = current
            task.optimizer_state_digest = blob() if rng.random() < 0.5 else None
            zero = s.scalar(
                select(ModelVersion).where(
                    ModelVersion.task_id == task_id, ModelVersion.version == 0
                )
            )
            assert zero is not None  # the API made it
            zero.created_at = past
            for digest in (zero.blob_digest, zero.broadcast_digest):
                if digest is not None:
                    age(db.blobs, digest)
            rows = {0: zero}
            for version in range(1, current + 1):
                rows[version] = ModelVersion(
                    task_id=task_id,
                    version=version,
                    blob_digest=blob(),
                    size_bytes=1,
                    broadcast_digest=blob() if rng.random() < 0.6 else None,
                    delta_digest=blob() if rng.random() < 0.6 else None,
                    created_at=past,
                )
                s.add(rows[version])
            bases: set[int] = set()
            for number in range(1, current + 2):
                last = number == current + 1
                round_status = (
                    [RoundStatus.OPEN, RoundStatus.AGGREGATING, RoundStatus.CLOSED][
                        int(rng.integers(3))
                    ]
                    if last
                    else [RoundStatus.CLOSED, RoundStatus.FAILED][int(rng.integers(2))]
                )
                base = number - 1 if rng.random() < 0.8 else int(rng.integers(0, current + 1))
                rnd = Round(task_id=task_id, number=number, base_version=base, status=round_status)
                s.add(rnd)
                s.flush()
                if round_status in ROUND_ACTIVE:
                    bases.add(base)
                for device_id in device_ids:
                    if rng.random() < 0.5:
                        continue
                    a_status = list(AssignmentStatus)[int(rng.integers(len(AssignmentStatus)))]
                    a_base = int(rng.integers(0, current + 1))
                    s.add(
                        Assignment(
                            task_id=task_id,
                            round_id=rnd.id,
                            device_id=device_id,
                            base_version=a_base,
                            status=a_status,
                        )
                    )
                    if a_status in ASSIGNMENT_ACTIVE:
                        bases.add(a_base)
                    u_status = list(UpdateStatus)[int(rng.integers(len(UpdateStatus)))]
                    digest = blob()
                    s.add(
                        Update(
                            task_id=task_id,
                            device_id=device_id,
                            round_id=rnd.id,
                            base_version=a_base,
                            num_examples=1,
                            blob_digest=digest,
                            byte_size=1,
                            staleness=0,
                            weight=1.0,
                            status=u_status,
                            idempotency_key=os.urandom(8).hex(),
                        )
                    )
                    if u_status == UpdateStatus.ACCEPTED and status not in TASK_TERMINAL:
                        world.must_keep.add(digest)
            n = default_keep if keep is None else keep
            kept = set(rows) if n == 0 else {0} | {v for v in rows if v > current - n} | bases
            for version, row in rows.items():
                world.all_versions[(task_id, version)] = row.blob_digest
                if version in kept:
                    world.kept_versions.add((task_id, version))
                    world.must_keep.update(
                        d
                        for d in (row.blob_digest, row.broadcast_digest, row.delta_digest)
                        if d is not None
                    )
            if task.optimizer_state_digest is not None:
                world.must_keep.add(task.optimizer_state_digest)
    for _ in range(4):  # never referenced, written long ago / just now
        digest = db.blobs.put(rng.bytes(300))
        age(db.blobs, digest)
        world.old_garbage.add(digest)
        world.young_garbage.add(db.blobs.put(rng.bytes(301)))
    return world


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_gc_keeps_exactly_what_kept_rows_name_and_the_api_serves_every_kept_version(
    settings: Settings, tls_paths: TlsPaths, db: Db, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    default_keep = int(rng.integers(0, 3))
    quiet = settings.model_copy(update={"scheduler_enabled": False})
    with serving(quiet, tls_paths) as server, fleet_of(server, 3) as fleet:
        task_ids = [create_task(server, aggregation={}, start=False) for _ in range(4)]
        world = build_world(db, rng, task_ids, [d.device_id for d in fleet], default_keep)
        assert world.old_garbage and world.young_garbage

        report = collect(db, default_keep=default_keep)

        present = stored(db)
        assert world.must_keep <= present, "a blob a kept row names was deleted"
        assert all(db.blobs.verify(d) for d in world.must_keep)
        # Everything else written long ago is gone; what was written just now stays.
        assert present == world.must_keep | world.young_garbage
        assert report.blobs_deleted > 0 and report.blobs_recent == len(world.young_garbage)
        with server.viewer() as viewer:
            for (task_id, version), digest in world.all_versions.items():
                r = viewer.get(f"{API}/tasks/{task_id}/models/{version}")
                if (task_id, version) in world.kept_versions:
                    assert r.status_code == 200, (task_id, version, r.text)
                    assert hashlib.sha256(r.content).hexdigest() == digest
                else:
                    assert r.status_code == 410, (task_id, version, r.text)
                    assert r.json()["error"] == "version_pruned"
            for task_id in task_ids:
                listed = viewer.get(f"{API}/tasks/{task_id}/models", params={"limit": 100})
                assert listed.status_code == 200, listed.text
                for item in listed.json()["items"]:
                    kept = (task_id, item["version"]) in world.kept_versions
                    assert (item["pruned_at"] is None) == kept, item
        # A second run finds nothing more to do.
        again = collect(db, default_keep=default_keep)
        assert (again.versions_pruned, again.blobs_deleted) == (0, 0)
        assert stored(db) == present


# ------------------------------------------------------------------- the grace period


def test_a_blob_written_just_before_its_row_is_committed_is_not_swept(db: Db) -> None:
    rng = np.random.default_rng(1)
    task_id = add_task(db, keep=None)
    data = rng.bytes(200)
    digest = db.blobs.put(data)  # an upload writes its blob ...
    report = collect(db)  # ... a collection runs before its row is committed ...
    assert db.blobs.exists(digest) and report.blobs_recent == 1 and report.blobs_deleted == 0
    with session_scope(db.sessions) as s:  # ... and the row is committed
        s.add(ModelVersion(task_id=task_id, version=0, blob_digest=digest, size_bytes=200))
    collect(db, grace_s=0.0)  # referenced now: kept whatever its age
    assert db.blobs.get(digest) == data


def test_writing_old_unreferenced_bytes_again_restarts_their_grace_period(db: Db) -> None:
    rng = np.random.default_rng(2)
    task_id = add_task(db, keep=None)
    data = rng.bytes(200)
    digest = db.blobs.put(data)
    age(db.blobs, digest)  # an old unreferenced blob: a collection now would delete it
    assert db.blobs.put(data) == digest  # the same bytes uploaded again
    assert collect(db).blobs_deleted == 0
    with session_scope(db.sessions) as s:
        s.add(ModelVersion(task_id=task_id, version=0, blob_digest=digest, size_bytes=200))
    assert db.blobs.get(digest) == data


class _UploadDuringSweep(FileBlobStore):
    """The same bytes are written again after the sweep listed the blob as old and before it
    deletes it (the upload whose row is committed right after)."""

    def __init__(self, root: Path, racing: dict[str, bytes], *, recheck: bool) -> None:
        super().__init__(root)
        self.racing = racing
        self.recheck = recheck

    def delete_if_older(self, digest: str, written_before: float) -> bool:
        if digest in self.racing:
            self.put(self.racing.pop(digest))
        if not self.recheck:  # what a delete without the second look would do
            return self.delete(digest)
        return super().delete_if_older(digest, written_before)


@pytest.mark.parametrize("recheck", [True, False])
def test_a_put_between_listing_and_deleting_keeps_the_blob(db: Db, recheck: bool) -> None:
    rng = np.random.default_rng(3)
    data = rng.bytes(200)
    digest = db.blobs.put(data)
    age(db.blobs, digest)
    store = _UploadDuringSweep(db.settings.blobs, {digest: data}, recheck=recheck)
    report = collect_garbage(db.sessions, store, default_keep=0, grace_s=GRACE_S, holder="test")
    # The store's own recheck keeps it; a plain delete would have lost it.
    assert db.blobs.exists(digest) is recheck
    assert report.blobs_deleted == (0 if recheck else 1)
    assert not any(p.name.startswith(".tmp-") for p in db.settings.blobs.rglob("*"))


# ------------------------------------------------------------------ retention policy


def test_keep_versions_prunes_the_oldest_but_version_zero_and_work_in_progress(db: Db) -> None:
    rng = np.random.default_rng(4)
    task_id = add_task(db, keep=2)
    digests = add_versions(db, task_id, 7, rng=rng)  # versions 0..6
    with session_scope(db.sessions) as s:
        s.add(Device(id="d1", name="d1", public_key="k" * 64))
        rnd = Round(task_id=task_id, number=1, base_version=2, status=RoundStatus.CLOSED)
        s.add(rnd)
        s.flush()
        s.add(
            Assignment(
                task_id=task_id,
                round_id=rnd.id,
                device_id="d1",
                base_version=2,
                status=AssignmentStatus.DOWNLOADED,
            )
        )
    report = collect(db)
    assert report.pruned == {task_id: [1, 3, 4]}
    assert pruned_versions(db, task_id) == [1, 3, 4]
    assert [db.blobs.exists(d) for d in digests] == [True, False, True, False, False, True, True]


def test_a_version_is_pruned_only_once_it_has_been_out_of_the_window_for_the_grace_period(
    db: Db,
) -> None:
    rng = np.random.default_rng(5)
    task_id = add_task(db, keep=1)
    add_versions(db, task_id, 3, rng=rng)  # 0, 1, 2: version 1 left the window long ago
    with session_scope(db.sessions) as s:  # version 3 is new: version 2 just left the window
        digest = db.blobs.put(rng.bytes(100))
        s.add(ModelVersion(task_id=task_id, version=3, blob_digest=digest, size_bytes=100))
        s.execute(update(Task).where(Task.id == task_id).values(current_version=3))
    assert collect(db).pruned == {task_id: [1]}
    assert collect(db, grace_s=0.0).pruned == {task_id: [2]}


def test_the_coordinator_default_applies_when_the_task_sets_none(db: Db) -> None:
    rng = np.random.default_rng(6)
    own, default, everything = (add_task(db, keep=k) for k in (3, None, 0))
    for task_id in (own, default, everything):
        add_versions(db, task_id, 6, rng=rng)
    report = collect(db, default_keep=1)
    assert report.pruned == {own: [1, 2], default: [1, 2, 3, 4]}
    assert pruned_versions(db, everything) == []


def test_unfinished_tasks_keep_their_waiting_updates_and_finished_ones_do_not(db: Db) -> None:
    rng = np.random.default_rng(7)
    with session_scope(db.sessions) as s:
        s.add(Device(id="d1", name="d1", public_key="k" * 64))
    digests: dict[tuple[TaskStatus, UpdateStatus], str] = {}
    for task_status in (TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.CANCELLED):
        task_id = add_task(db, keep=None, status=task_status)
        with session_scope(db.sessions) as s:
            for update_status in UpdateStatus:
                digest = db.blobs.put(rng.bytes(50))
                age(db.blobs, digest)
                digests[(task_status, update_status)] = digest
                s.add(
                    Update(
                        task_id=task_id,
                        device_id="d1",
                        base_version=0,
                        num_examples=1,
                        blob_digest=digest,
                        byte_size=50,
                        staleness=0,
                        weight=1.0,
                        status=update_status,
                        idempotency_key=digest[:16],
                    )
                )
    collect(db)
    kept = {key for key, digest in digests.items() if db.blobs.exists(digest)}
    assert kept == {
        (TaskStatus.RUNNING, UpdateStatus.ACCEPTED),
        (TaskStatus.PAUSED, UpdateStatus.ACCEPTED),
    }


# --------------------------------------------------------------- dry run, lease, CLI


def test_dry_run_changes_nothing_and_reports_what_a_run_does(db: Db) -> None:
    rng = np.random.default_rng(8)
    task_id = add_task(db, keep=1)
    add_versions(db, task_id, 4, rng=rng)
    garbage = db.blobs.put(rng.bytes(70))
    age(db.blobs, garbage)
    before = stored(db)

    dry = collect(db, dry_run=True)
    assert (dry.versions_pruned, dry.blobs_deleted, dry.bytes_deleted) == (2, 3, 270)
    assert dry.pruned == {task_id: [1, 2]}
    assert stored(db) == before and pruned_versions(db, task_id) == []

    real = collect(db)
    assert (real.versions_pruned, real.blobs_deleted, real.bytes_deleted) == (2, 3, 270)
    assert stored(db) == before - {garbage} - {
        d for (t, v), d in _version_digests(db, task_id).items() if v in (1, 2)
    }


def _version_digests(db: Db, task_id: int) -> dict[tuple[int, int], str]:
    rows = db.read(
        lambda s: s.execute(
            select(ModelVersion.version, ModelVersion.blob_digest).where(
                ModelVersion.task_id == task_id
            )
        ).all()
    )
    return {(task_id, v): d for v, d in rows}


def test_a_second_collector_waits_for_the_lease_and_deletes_nothing(db: Db) -> None:
    rng = np.random.default_rng(9)
    garbage = db.blobs.put(rng.bytes(70))
    age(db.blobs, garbage)
    with session_scope(db.sessions) as s:
        assert leases.acquire(s, LEASE_NAME, holder="other:gc", ttl_s=600, now=utcnow())
    with pytest.raises(GcBusy):
        collect(db)
    assert db.blobs.exists(garbage)
    assert collect(db, dry_run=True).blobs_deleted == 1  # a dry run needs no lease
    with session_scope(db.sessions) as s:
        leases.release(s, LEASE_NAME, holder="other:gc")
    assert collect(db).blobs_deleted == 1
    assert not db.blobs.exists(garbage)


def _cli(capsys: pytest.CaptureFixture[str], settings: Settings, *extra: str) -> tuple[int, str]:
    code = main(
        [
            "gc",
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.database_url,
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, out + err


def test_cli_gc_dry_run_then_for_real(capsys, settings: Settings, db: Db) -> None:
    rng = np.random.default_rng(10)
    task_id = add_task(db, keep=2)
    add_versions(db, task_id, 4, rng=rng)
    garbage = db.blobs.put(rng.bytes(1000))
    age(db.blobs, garbage)
    young = db.blobs.put(rng.bytes(10))

    code, out = _cli(capsys, settings, "--dry-run")
    assert code == 0, out
    assert "Dry run: nothing changed." in out
    assert "versions would prune   1" in out and f"task {task_id}: 1" in out
    assert "blobs would delete     2 (1.1 KiB)" in out
    assert "blobs kept, recent      1 (10 B" in out
    assert db.blobs.exists(garbage) and pruned_versions(db, task_id) == []

    code, out = _cli(capsys, settings, "--grace-s", "0")
    assert code == 0, out
    assert "versions pruned        1" in out
    assert "blobs deleted          3 (1.1 KiB)" in out  # the young blob too: no grace
    assert not db.blobs.exists(garbage) and not db.blobs.exists(young)
    assert pruned_versions(db, task_id) == [1]

    code, out = _cli(capsys, settings)
    assert code == 0 and "blobs deleted          0 (0 B)" in out, out


def test_cli_gc_refuses_what_it_cannot_do(capsys, settings: Settings, db: Db) -> None:
    code, out = _cli(capsys, settings, "--grace-s", "-1")
    assert code == 2 and "--grace-s" in out
    with session_scope(db.sessions) as s:
        assert leases.acquire(s, LEASE_NAME, holder="other:gc", ttl_s=600, now=utcnow())
    code, out = _cli(capsys, settings)
    assert code == 1 and "another coordinator is collecting" in out


def test_cli_gc_on_an_unmigrated_database_says_so(capsys, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "0004")
    code = main(["gc", "--data-dir", str(tmp_path), "--database-url", url])
    out, err = capsys.readouterr()
    assert code == 1 and "expected" in err and "run migrations" in err, out + err


# ------------------------------------------------------------- the automatic collection


def test_the_coordinator_collects_on_its_own(
    settings: Settings, tls_paths: TlsPaths, db: Db
) -> None:
    rng = np.random.default_rng(12)
    garbage = db.blobs.put(rng.bytes(70))
    age(db.blobs, garbage)
    auto = settings.model_copy(update={"gc_interval_s": 0.1, "gc_grace_s": 60.0})
    with serving(auto, tls_paths) as server:
        task_id = create_task(server, aggregation={}, start=False)
        job = server.app.state.gc_job
        wait_until(lambda: job.runs >= 2)
        assert not db.blobs.exists(garbage)
        zero = db.version(task_id, 0)
        assert zero is not None and db.blobs.exists(zero.blob_digest)
        with server.viewer() as viewer:
            assert viewer.get(f"{API}/tasks/{task_id}/models/0").status_code == 200
    assert server.app.state.gc_job.last.blobs_deleted == 0  # the second run found nothing


# ------------------------------------------- a real task: pruned versions and delta chains

MODEL = {"architecture": "softmax", "input_dim": 64, "num_classes": 10}
DOWNLOAD = {"topk_fraction": 0.1, "bits": 8, "chunk": 64}


def _model(device: TestDevice, task_id: int, version: int, have: int | None = None):
    params = {} if have is None else {"have": have}
    return device.get(f"{API}/device/tasks/{task_id}/models/{version}", params=params)


def test_pruned_versions_answer_410_and_a_broken_chain_falls_back_to_the_full_model(
    coordinator: Coordinator, db: Db
) -> None:
    rng = np.random.default_rng(13)
    rounds = 5
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation=every_device(2, rounds=rounds, keep_versions=2),
            compression={**EXACT, "download": DOWNLOAD},
            model=MODEL,
        )
        spec = ModelSpec.from_dict(db.task(task_id).model_spec)
        held = {}
        for version in range(rounds):
            for device in fleet:
                work = device.work(wait=20)
                assert work is not None and work["base_version"] == version, work
                body = make_update(
                    work, delta=random_delta(spec_of(work), rng, 0.05), num_examples=5
                )
                assert device.upload(work, body).status_code == 201
            wait_until(lambda v=version: db.task(task_id).current_version >= v + 1, timeout=30)
            if version + 1 in (1, 3):  # the device keeps these broadcast models
                r = _model(fleet[0], task_id, version + 1)
                assert r.status_code == 200, r.text
                held[version + 1] = decode_model(r.content, spec=spec)
        db.wait_task(task_id, lambda t: t.status == TaskStatus.COMPLETED)
        # Before collecting, the device far behind gets a chain from version 1.
        assert blob_kind(_model(fleet[0], task_id, rounds, have=1).content) == KIND_CHAIN
        updates = [u.blob_digest for u in db.updates(task_id)]
        assert len(updates) == 2 * rounds and all(db.blobs.exists(d) for d in updates)

        report = collect(db, grace_s=0.0)

        assert report.pruned == {task_id: [1, 2, 3]}
        assert not any(db.blobs.exists(d) for d in updates)  # applied: no longer needed
        latest = db.version(task_id, rounds)
        assert latest is not None
        served = db.blobs.get(latest.served_digest)
        # Far behind: the chain needs the pruned deltas 2 and 3, so the full model.
        r = _model(fleet[0], task_id, rounds, have=1)
        assert r.status_code == 200 and blob_kind(r.content) == KIND_MODEL
        assert r.content == served
        # From pruned version 3 the chain runs through kept versions 4 and 5 only.
        r = _model(fleet[0], task_id, rounds, have=3)
        assert r.status_code == 200 and blob_kind(r.content) == KIND_CHAIN
        rebuilt = rebuild(held[3], r.content, spec, task_id=task_id, have=3, want=rounds)
        for name, value in decode_model(served, spec=spec).items():
            np.testing.assert_array_equal(rebuilt[name], value)
        # A pruned version itself: 410 version_pruned to devices and administrators.
        with coordinator.viewer() as viewer:
            for response in (
                _model(fleet[1], task_id, 2),
                viewer.get(f"{API}/tasks/{task_id}/models/2"),
            ):
                assert response.status_code == 410, response.text
                assert response.json()["error"] == "version_pruned"
            for version in (0, 4, 5):
                r = viewer.get(f"{API}/tasks/{task_id}/models/{version}")
                assert r.status_code == 200, (version, r.text)
