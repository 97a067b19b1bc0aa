"""Data preparation for bench/aggregate.py, entirely through the coordinator's own functions.

A migrated database (SQLite file or a fresh PostgreSQL database), a blob store, enrolled
devices (``fedge.coordinator.enrollment``), one task per measured size
(``fedge.coordinator.tasks``), a sync round opened by the round engine
(``rounds.open_sync_round``), one upload per assignment through the upload path
(``fedge.coordinator.engine.updates.accept_upload``: decode and check, blob write, ``Update`` row),
and the round closed by the engine (``rounds.close_sync_round_if_due`` -> ``aggregating``). What is
left is exactly the state a coordinator is in when a round's
aggregation starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.updates import accept_upload
from fedge.coordinator.enrollment import create_token, enroll_device
from fedge.coordinator.migrate import upgrade
from fedge.coordinator.models import Assignment, Device, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.tasks import TaskCreate
from fedge.coordinator.settings import Settings
from fedge.coordinator.tasks import create_task, transition
from fedge.shared.architectures import build_spec
from fedge.shared.compression import CompressedUpdate, compress
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.signing import public_key_to_b64
from fedge.shared.wire import encode_update

#: A ~1M-parameter built-in MLP: 784 -> 1024 -> 192 -> 10 (1,002,570 float32 parameters).
MODEL: dict[str, Any] = {
    "architecture": "mlp",
    "input_dim": 784,
    "num_classes": 10,
    "hidden": [1024, 192],
    "seed": 0,
}


@dataclass(frozen=True)
class PolicyCase:
    """A compression policy under test and how its uploads are generated.

    ``distinct``: every upload has its own bytes (the pool's encodings re-serialized with a
    distinct ``num_examples``), so every ``Update`` row names its own blob. Otherwise the
    pool's bodies are uploaded as they are and the content-addressed store keeps one blob per
    pool entry (rows still each name a blob, and aggregation still reads and decodes each).
    """

    name: str
    policy: CompressionPolicy
    distinct: bool


@dataclass(frozen=True)
class Prepared:
    task_id: int
    size: int
    distinct_blobs: int
    upload_bytes: int
    seconds: float


def open_runtime(url: str, data_dir: Path) -> Runtime:
    """Migrate ``url`` to head and open a runtime on it (the scheduler is not started)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    settings = Settings(data_dir=data_dir, database_url=url, scheduler_enabled=False)
    return Runtime.open(settings)


@contextmanager
def postgres_database(admin_url: str, name: str) -> Iterator[str]:
    """A fresh PostgreSQL database ``name`` (dropped first if left over, and afterwards)."""
    url = make_url(admin_url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def enroll_devices(runtime: Runtime, n: int, rng: np.random.Generator) -> None:
    """``n`` devices enrolled with one token and seeded Ed25519 keys, marked seen now (as
    their first signed request would)."""
    with session_scope(runtime.sessions) as session:
        _, secret = create_token(session, label="bench", max_uses=n, expires_in_s=86400)
    with session_scope(runtime.sessions) as session:
        now = utcnow()
        for i in range(n):
            key = Ed25519PrivateKey.from_private_bytes(rng.bytes(32)).public_key()
            device, _ = enroll_device(
                session,
                token=secret,
                public_key=public_key_to_b64(key),
                name=f"bench-{i}",
                capabilities={},
            )
            device.last_seen_at = now


def count_devices(runtime: Runtime) -> int:
    with session_scope(runtime.sessions) as session:
        return len(session.scalars(select(Device.id)).all())


def model_spec() -> ModelSpec:
    return build_spec(MODEL)


def make_pool(
    case: PolicyCase, spec: ModelSpec, pool_size: int, rng: np.random.Generator
) -> list[CompressedUpdate]:
    """``pool_size`` compressed updates of seeded N(0, 0.01^2) deltas (one-shot, no residual)."""
    pool = []
    for _ in range(pool_size):
        delta = {
            t.name: (0.01 * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.tensors
        }
        pool.append(compress(delta, case.policy, rng))
    return pool


def create_running_task(runtime: Runtime, case: PolicyCase, size: int) -> int:
    """A sync task whose rounds wait for ``size`` updates; one aggregation finishes it."""
    body = TaskCreate.model_validate(
        {
            "name": f"bench-{case.name}-{size}",
            "model": MODEL,
            "aggregation": {
                "mode": "sync",
                "clients_per_round": size,
                "over_selection": 0.0,
                "min_updates": 1,
                "num_rounds": 1,
                "round_deadline_s": 86400.0,
            },
            "compression": case.policy.to_dict(),
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        }
    )
    with session_scope(runtime.sessions) as session:
        task = create_task(session, runtime.blobs, runtime.settings, body)
        transition(session, task, "start")
        return task.id


def prepare_round(
    runtime: Runtime,
    case: PolicyCase,
    size: int,
    pool: list[CompressedUpdate],
    rng: np.random.Generator,
) -> Prepared:
    """A task with ``size`` accepted uploads in a round the engine marked ``aggregating``."""
    start = time.perf_counter()
    task_id = create_running_task(runtime, case, size)
    settings = runtime.settings
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        cfg = AggregationConfig.from_dict(task.aggregation)
        rnd, assigned = rounds.open_sync_round(
            session, task, cfg, now=utcnow(), liveness=Liveness.from_settings(settings)
        )
        if rnd is None or len(assigned) != size:
            raise RuntimeError(f"could not assign {size} devices (got {len(assigned)})")
        round_id = rnd.id
        work = [
            (a.id, a.device_id)
            for a in session.scalars(
                select(Assignment).where(Assignment.round_id == round_id).order_by(Assignment.id)
            )
        ]
    examples = rng.integers(20, 200, size=size)
    shared_bodies = [
        encode_update(c, task_id=task_id, base_version=0, num_examples=100) for c in pool
    ]
    upload_bytes = 0
    for i, (assignment_id, device_id) in enumerate(work):
        if case.distinct:
            # A distinct num_examples per upload makes every body (and blob) distinct.
            body = encode_update(
                pool[i % len(pool)],
                task_id=task_id,
                base_version=0,
                num_examples=int(examples[i]) * size + i,
            )
        else:
            body = shared_bodies[i % len(pool)]
        accept_upload(
            runtime,
            device_id=device_id,
            assignment_id=assignment_id,
            key=f"t{task_id}-u{i}",
            body=body,
        )
        upload_bytes += len(body)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        cfg = AggregationConfig.from_dict(task.aggregation)
        rounds.close_sync_round_if_due(session, task, rnd, cfg, now=utcnow())
        if rnd.status != "aggregating":
            raise RuntimeError(f"round of task {task_id} is {rnd.status}, not aggregating")
        digests = set(session.scalars(select(Update.blob_digest).where(Update.task_id == task_id)))
    return Prepared(
        task_id=task_id,
        size=size,
        distinct_blobs=len(digests),
        upload_bytes=upload_bytes,
        seconds=time.perf_counter() - start,
    )
