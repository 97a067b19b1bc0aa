"""A scheduler step never asks the pool for a second connection while it holds one.

The step holds a pooled connection and the task's row lock; the requests that wait for that
row lock hold the rest of the pool. A second checkout inside the step (a fresh reading of the
fleet's pace state, once every two seconds) then waited for the pool's timeout, and every
request of the task with it (seen on PostgreSQL under load: 30 s stalls). Here the pool has
one connection: a step that asked for a second one fails with the pool's timeout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedge.coordinator.blobstore_db import open_blob_store
from fedge.coordinator.db import make_engine, make_sessionmaker
from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.rounds import Db, create_task, every_device, fleet_of


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


@pytest.fixture
def one_connection(settings: Settings) -> Iterator[Runtime]:
    """A runtime on the coordinator's database whose pool holds a single connection."""
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0, pool_timeout=3)
    runtime = Runtime(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        blobs=open_blob_store(settings),
    )
    yield runtime
    runtime.close()


@pytest.mark.parametrize(
    "aggregation",
    [
        {"mode": "async", "buffer_size": 5, "max_concurrency": 2, "num_rounds": 3},
        every_device(2, rounds=3),
    ],
    ids=["async", "sync"],
)
def test_a_step_with_a_stale_pace_reading_needs_one_connection(
    coordinator: Coordinator, db: Db, one_connection: Runtime, aggregation: dict
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(coordinator, aggregation=aggregation)
        assert one_connection.pacer is None  # no reading yet: the step reads the pace state
        # A fresh stepper each time: it takes the full step (not the idle async look).
        TaskStepper(one_connection).step(task_id)
        assert one_connection.pacer is not None and one_connection.pacer.state is not None
        assert all(device.work() for device in fleet)
        one_connection.pacer.state = None  # stale again
        TaskStepper(one_connection).step(task_id)  # the buffer waits, the round is open
        assert one_connection.pacer.state is not None
    assert db.task(task_id).status == "running"
