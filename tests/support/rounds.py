"""Helpers for round-engine tests: tasks through the admin API, fleets of signed devices,
hand-made updates, and reading the database the coordinator writes.

Usage (``coordinator`` is the fixture of tests/coordinator/conftest.py)::

    fleet = Fleet.enroll(coordinator, 5)            # signed devices, each seen once
    task_id = create_task(coordinator, aggregation={...}, start=True)
    work = fleet[0].work(wait=5)                    # the device's assignment (or None)
    body = make_update(work, delta=..., num_examples=10)
    r = fleet[0].upload(work, body)
    wait_until(lambda: db.task(task_id).current_version == 1)
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, cast

import httpx
import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from fedge.coordinator.blobstore import FileBlobStore
from fedge.coordinator.blobstore_db import DatabaseBlobStore, TieredBlobStore, open_blob_store
from fedge.coordinator.db import make_engine, make_sessionmaker
from fedge.coordinator.models import Assignment, Device, ModelVersion, Round, Task, Update
from fedge.coordinator.settings import Settings
from fedge.shared.compression import compress
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_model, decode_update, encode_update
from tests.support.device import API, SignedDevice, make_token

T = TypeVar("T")

#: A tiny built-in model (W [4, 3], b [3]) and a lossless policy, so results are exact.
SMALL_MODEL = {"architecture": "softmax", "input_dim": 4, "num_classes": 3}
EXACT = {"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False}


class _Server(Protocol):
    url: str
    settings: Settings

    def admin(self) -> httpx.Client: ...


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float = 20.0, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something truthy (the value is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def every_device(
    n: int, *, rounds: int = 1, deadline_s: float = 600, **extra: Any
) -> dict[str, Any]:
    """Sync aggregation settings in which each round selects ``n`` devices, no more, and waits
    for the updates of all of them (the set-up of most round tests)."""
    return {
        "clients_per_round": n,
        "over_selection": 0.0,
        "min_updates": n,
        "round_deadline_s": deadline_s,
        "num_rounds": rounds,
        **extra,
    }


def create_task(
    server: _Server,
    *,
    aggregation: dict[str, Any],
    compression: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    requirements: dict[str, Any] | None = None,
    start: bool = True,
) -> int:
    with server.admin() as admin:
        r = admin.post(
            f"{API}/tasks",
            json={
                "name": f"t-{secrets.token_hex(3)}",
                "model": model or SMALL_MODEL,
                "aggregation": aggregation,
                "compression": compression or EXACT,
                "training": {"epochs": 1, "batch_size": 8, "lr": 0.1},
                **({"requirements": requirements} if requirements is not None else {}),
            },
        )
        assert r.status_code == 201, r.text
        task_id: int = r.json()["id"]
        if start:
            action(server, task_id, "start")
    return task_id


def action(server: _Server, task_id: int, name: str) -> None:
    with server.admin() as admin:
        r = admin.post(f"{API}/tasks/{task_id}/{name}")
        assert r.status_code == 200, r.text


class TestDevice(SignedDevice):
    """A signed device with the work-cycle calls."""

    __test__ = False

    def work(self, *, wait: float = 0, current: int | None = None) -> dict[str, Any] | None:
        params: dict[str, Any] = {"wait": int(wait)}
        if current is not None:
            params["current"] = current
        r = self.get(f"{API}/device/work", params=params)
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def upload(
        self, work: dict[str, Any], body: bytes, *, key: str | None = None
    ) -> httpx.Response:
        return self.post(
            work["upload_url"],
            content=body,
            headers={"Idempotency-Key": key or secrets.token_hex(8)},
        )

    def decline(self, assignment_id: int, reason: str, detail: str = "") -> httpx.Response:
        return self.post(
            f"{API}/device/assignments/{assignment_id}/decline",
            json={"reason": reason, "detail": detail},
        )

    def report(self, **capabilities: Any) -> httpx.Response:
        return self.request("PUT", f"{API}/device/capabilities", json=capabilities)

    def metrics(self, assignment_id: int, **values: Any) -> httpx.Response:
        return self.post(f"{API}/device/assignments/{assignment_id}/metrics", json=values)


class Fleet(list[TestDevice]):
    @classmethod
    def enroll(cls, server: Any, n: int) -> Fleet:
        """``n`` enrolled devices, each having made one signed request (so it counts as
        recently seen)."""
        token = make_token(server, max_uses=n)
        fleet = cls()
        for i in range(n):
            device = cast(TestDevice, TestDevice.enroll(server, token=token, name=f"dev-{i}"))
            assert device.work(wait=0) is None
            fleet.append(device)
        return fleet

    def by_id(self, device_id: str) -> TestDevice:
        return next(d for d in self if d.device_id == device_id)

    def close(self) -> None:
        for d in self:
            d.close()


@contextmanager
def fleet_of(server: Any, n: int) -> Iterator[Fleet]:
    fleet = Fleet.enroll(server, n)
    try:
        yield fleet
    finally:
        fleet.close()


def spec_of(work: dict[str, Any]) -> ModelSpec:
    return ModelSpec.from_dict(work["spec"])


def random_delta(spec: ModelSpec, rng: np.random.Generator, scale: float = 0.1) -> Weights:
    return {t.name: (scale * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.tensors}


def make_update(
    work: dict[str, Any],
    *,
    delta: Weights,
    num_examples: int,
    rng: np.random.Generator | None = None,
    task_id: int | None = None,
    base_version: int | None = None,
    metrics: dict[str, float] | None = None,
) -> bytes:
    """Encode ``delta`` for an assignment with the task's policy (lossless by default),
    carrying ``metrics`` in its metrics block."""
    policy = CompressionPolicy.from_dict(work["compression"])
    c = compress(delta, policy, rng or np.random.default_rng(0))
    return encode_update(
        c,
        task_id=work["task_id"] if task_id is None else task_id,
        base_version=work["base_version"] if base_version is None else base_version,
        num_examples=num_examples,
        metrics=metrics,
    )


def decoded_delta(body: bytes, spec: ModelSpec) -> Weights:
    """What the coordinator sees of an encoded update (dense)."""
    return decode_update(body, spec=spec).to_dense()


class Db:
    """Read access to the coordinator's database and blob store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        # The coordinator's backend: files (with the database's rows for small update bodies
        # beside them, unless inline_update_max_bytes is 0) or rows only.
        self.blobs = cast(
            FileBlobStore | DatabaseBlobStore | TieredBlobStore,
            open_blob_store(settings),
        )

    def close(self) -> None:
        self.blobs.close()
        self.engine.dispose()

    def read(self, fn: Callable[[Session], T]) -> T:
        with self.sessions() as session:
            value = fn(session)
            session.expunge_all()  # keep loaded attributes readable after the session ends
            return value

    def task(self, task_id: int) -> Task:
        task = self.read(lambda s: s.get(Task, task_id))
        assert task is not None, f"no task {task_id}"
        return task

    def wait_task(
        self, task_id: int, predicate: Callable[[Task], bool], *, timeout: float = 20.0
    ) -> Task:
        """The task once ``predicate`` holds for it (polling the database)."""

        def probe() -> Task | None:
            task = self.task(task_id)
            return task if predicate(task) else None

        return wait_until(probe, timeout=timeout)

    def wait_round(
        self, task_id: int, number: int, *, closed: bool = False, timeout: float = 20.0
    ) -> Round:
        """Round ``number`` once it exists (and, with ``closed``, once it closed or failed)."""

        def probe() -> Round | None:
            rnd = self.round(task_id, number)
            if rnd is None or (closed and rnd.closed_at is None):
                return None
            return rnd

        return wait_until(probe, timeout=timeout)

    def rounds(self, task_id: int) -> list[Round]:
        return self.read(
            lambda s: list(
                s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.number))
            )
        )

    def round(self, task_id: int, number: int) -> Round | None:
        return self.read(
            lambda s: s.scalar(
                select(Round).where(Round.task_id == task_id, Round.number == number)
            )
        )

    def updates(self, task_id: int) -> list[Update]:
        return self.read(
            lambda s: list(
                s.scalars(select(Update).where(Update.task_id == task_id).order_by(Update.id))
            )
        )

    def assignments(self, task_id: int) -> list[Assignment]:
        return self.read(
            lambda s: list(
                s.scalars(
                    select(Assignment).where(Assignment.task_id == task_id).order_by(Assignment.id)
                )
            )
        )

    def device(self, device_id: str) -> Device:
        device = self.read(lambda s: s.get(Device, device_id))
        assert device is not None, f"no device {device_id}"
        return device

    def version(self, task_id: int, version: int) -> ModelVersion | None:
        return self.read(
            lambda s: s.scalar(
                select(ModelVersion).where(
                    ModelVersion.task_id == task_id, ModelVersion.version == version
                )
            )
        )

    def weights(self, task_id: int, version: int) -> Weights:
        row = self.version(task_id, version)
        assert row is not None, f"task {task_id} has no version {version}"
        return decode_model(self.blobs.get(row.blob_digest))
