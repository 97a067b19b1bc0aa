"""Async (FedBuff-style) mode: work on demand up to the concurrency cap, one aggregation per
``buffer_size`` accepted updates, oldest first, with staleness weights.

The scheduler is disabled here and the test steps the engine itself, so it controls exactly
when aggregation runs (and can let more than ``buffer_size`` updates pile up)."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support.rounds import (
    Db,
    create_task,
    decoded_delta,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


def _stepper(coordinator: Coordinator) -> TaskStepper:
    runtime: Runtime = coordinator.app.state.runtime
    return TaskStepper(runtime)


def test_async_aggregates_exactly_buffer_size_updates_oldest_first(
    coordinator: Coordinator, db: Db
) -> None:
    stepper = _stepper(coordinator)
    with fleet_of(coordinator, 6) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "mode": "async",
                "buffer_size": 3,
                "max_concurrency": 5,
                "max_staleness": 2,
                "staleness": {"function": "hinge", "a": 1.0, "b": 0},
                "num_rounds": 10,
            },
        )
        assert fleet[0].work() is None  # no round before the engine opened one
        stepper.step(task_id)
        rnd1 = db.round(task_id, 1)
        assert rnd1 is not None and (rnd1.status, rnd1.base_version) == ("open", 0)

        works = [d.work() for d in fleet[:5]]
        assert all(w is not None and w["mode"] == "async" for w in works)
        assert fleet[5].work() is None  # the concurrency cap (5) is reached
        spec = spec_of(works[0])  # type: ignore[arg-type]
        rng = np.random.default_rng(5)
        bodies = []
        for i, (device, work) in enumerate(zip(fleet[:5], works, strict=True)):
            assert work is not None
            body = make_update(work, delta=random_delta(spec, rng), num_examples=10 + i)
            r = device.upload(work, body)
            assert r.status_code == 201, r.text
            bodies.append(body)
        # A device works once per model version; a freed slot goes to a device that has not.
        assert fleet[0].work() is None
        extra = fleet[5].work()
        assert extra is not None and extra["base_version"] == 0

        stepper.step(task_id)
        ups = db.updates(task_id)
        assert [u.applied_version for u in ups] == [1, 1, 1, None, None]
        assert db.version(task_id, 1).num_updates == 3  # type: ignore[union-attr]
        assert_weights_equal(
            db.weights(task_id, 1),
            expected_model(
                db.weights(task_id, 0), [decoded_delta(b, spec) for b in bodies[:3]], [10, 11, 12]
            ),
        )
        rnd1 = db.round(task_id, 1)
        assert rnd1 is not None
        assert (rnd1.status, rnd1.num_received, rnd1.result_version) == ("closed", 3, 1)
        rnd2 = db.round(task_id, 2)
        assert rnd2 is not None and (rnd2.status, rnd2.base_version) == ("open", 1)

        # Work on version 1; the two leftovers (tau = 1, s = 1/2) are the oldest and go first.
        new = [d.work() for d in fleet[:2]]
        for i, (device, work) in enumerate(zip(fleet[:2], new, strict=True)):
            assert work is not None and work["base_version"] == 1
            body = make_update(work, delta=random_delta(spec, rng), num_examples=20 + i)
            r = device.upload(work, body)
            assert r.status_code == 201 and r.json()["staleness"] == 0
            bodies.append(body)
        stepper.step(task_id)
        ups = db.updates(task_id)
        assert [u.applied_version for u in ups] == [1, 1, 1, 2, 2, 2, None]
        assert_weights_equal(
            db.weights(task_id, 2),
            expected_model(
                db.weights(task_id, 1),
                [decoded_delta(b, spec) for b in bodies[3:6]],
                [13 * 0.5, 14 * 0.5, 20],
            ),
        )
        assert [u.weight for u in ups[3:6]] == pytest.approx([6.5, 7.0, 20.0])
        rnd2 = db.round(task_id, 2)
        assert rnd2 is not None and (rnd2.num_received, rnd2.num_stale) == (3, 2)
        # One update waits for the next buffer; stepping again changes nothing.
        stepper.step(task_id)
        assert db.task(task_id).current_version == 2
        rnd3 = db.round(task_id, 3)
        assert rnd3 is not None and (rnd3.status, rnd3.num_received) == ("open", 1)


def test_expired_async_leases_are_dropped_and_free_their_slot(
    coordinator: Coordinator, db: Db
) -> None:
    stepper = _stepper(coordinator)
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={"mode": "async", "buffer_size": 2, "max_concurrency": 1, "lease_s": 0.2},
        )
        stepper.step(task_id)
        first = fleet[0].work()
        assert first is not None
        assert fleet[1].work() is None
        # Past the lease, the next step drops the assignment and the slot is free again.
        wait_until(lambda: stepper.step(task_id).woken == [fleet[0].device_id])
        assert db.assignments(task_id)[0].status == "dropped"
        assert db.device(fleet[0].device_id).num_dropped == 1
        assert fleet[1].work() is not None
        stopped = fleet[0].work(current=first["assignment_id"])
        assert stopped is not None and stopped["status"] == "cancelled"
