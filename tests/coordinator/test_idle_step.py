"""An idle async task's scheduler step skips its write transaction
(:mod:`fedge.coordinator.engine.idlestep`): the idle step takes the step's place only when the
full step would write nothing but the round's counter, and any other change makes the full
step run."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import event, select, update

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import idlestep, scheduler
from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.models import Assignment, Round, Task
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.rounds import Db, create_task, fleet_of, make_update, random_delta, spec_of


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Steps happen when the test makes them, never in between.
    return settings.model_copy(update={"scheduler_enabled": False})


def test_an_idle_async_step_writes_at_most_its_counter_and_any_change_makes_it_run(
    coordinator: Coordinator, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime: Runtime = coordinator.app.state.runtime
    stepper = TaskStepper(runtime)
    look = idlestep.idle_async_step
    rng = np.random.default_rng(11)
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator, aggregation={"mode": "async", "buffer_size": 3, "max_concurrency": 2}
        )
        assert not look(runtime, task_id, now=utcnow())  # no round yet: the step opens it
        stepper.step(task_id)
        works = [device.work() for device in fleet]
        assert all(works)
        stepper.step(task_id)
        assert look(runtime, task_id, now=utcnow())

        # The full step, the look bypassed, agrees: it flushes nothing.
        flushes: list[int] = []

        def count(*_args: object) -> None:
            flushes.append(1)

        event.listen(runtime.sessions, "after_flush", count)
        try:
            with monkeypatch.context() as m:
                m.setattr(scheduler, "idle_async_step", lambda *_a, **_k: False)
                stepper.step(task_id)
        finally:
            event.remove(runtime.sessions, "after_flush", count)
        assert flushes == []
        assert look(runtime, task_id, now=utcnow())

        # A lease that runs out is the step's to drop.
        ends = db.read(
            lambda s: s.scalars(
                select(Assignment.lease_expires_at).where(Assignment.task_id == task_id)
            ).all()
        )
        assert all(ends)
        assert not look(runtime, task_id, now=min(ends) + timedelta(seconds=1))

        # An accepted update not yet counted in the round's num_received.
        work = works[0]
        assert work is not None
        body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=5)
        assert fleet[0].upload(work, body).status_code == 201
        assert look(runtime, task_id, now=utcnow())  # counts it, nothing else to do
        assert (
            db.read(
                lambda s: s.scalar(
                    select(Round.num_received).where(
                        Round.task_id == task_id, Round.status == "open"
                    )
                )
            )
            == 1
        )

        # A status reason to clear, and a task that is not running.
        with session_scope(runtime.sessions) as session:
            session.execute(update(Task).where(Task.id == task_id).values(status_reason="x"))
        assert not look(runtime, task_id, now=utcnow())
        stepper.step(task_id)  # someone works: the step clears it
        assert db.task(task_id).status_reason is None
        assert look(runtime, task_id, now=utcnow())
        with coordinator.admin() as admin:
            assert admin.post(f"/api/v1/tasks/{task_id}/pause").status_code == 200
        assert not look(runtime, task_id, now=utcnow())
    assert not look(runtime, 10_000, now=utcnow())  # no such task
