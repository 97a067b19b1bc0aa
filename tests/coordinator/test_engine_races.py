"""Single races between the round engine and uploads, forced into one interleaving each
(tests/support/interleave.py), and stale async work.

The interleaved cases are PostgreSQL's: there, under READ COMMITTED, one writer can read a
row, another commit a change to it, and the first then write from what it read. On SQLite
every write transaction holds the database's write lock from its first statement, so the
same interleavings cannot happen (the chaos tests in test_concurrency_invariants.py run the
whole mix on both backends).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from fedge.coordinator.db import READ_ONLY_OPTION, utcnow
from fedge.coordinator.engine.scheduler import StepOutcome, TaskStepper
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.chaos import check_invariants
from tests.support.interleave import interleave
from tests.support.rounds import (
    Db,
    Fleet,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

ON_POSTGRES = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


@pytest.fixture
def replica(coordinator: Coordinator) -> Iterator[Runtime]:
    """A second coordinator's engine on the same database (its own connection pool)."""
    runtime = Runtime.open(coordinator.settings)
    yield runtime
    runtime.close()


def _body(work: dict[str, Any], seed: int) -> bytes:
    delta = random_delta(spec_of(work), np.random.default_rng(seed))
    return make_update(work, delta=delta, num_examples=10)


def _statement_on(table: str, *, writing: bool = False, has: str = "") -> Any:
    def match(conn: Any, statement: str) -> bool:
        if not statement.lstrip().upper().startswith("SELECT") or f"FROM {table}" not in statement:
            return False
        if writing and conn.get_execution_options().get(READ_ONLY_OPTION):
            return False
        return has in statement

    return match


def _problems(db: Db, task_id: int) -> list[str]:
    return check_invariants(db, task_id)


@ON_POSTGRES
@pytest.mark.postgres
def test_a_replica_that_finds_the_round_aggregated_leaves_it_closed(
    coordinator: Coordinator, db: Db, replica: Runtime
) -> None:
    """Case: replica B reads the round as aggregating, replica A commits its aggregation, B
    then finds no update left. B must not mark the closed round failed."""
    a = TaskStepper(coordinator.app.state.runtime)
    b = TaskStepper(replica)
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 3,
                "over_selection": 0.0,
                "min_updates": 3,
                "round_deadline_s": 600,
                "num_rounds": 5,
            },
        )
        a.step(task_id)
        for i, device in enumerate(fleet):
            work = device.work()
            assert work is not None
            assert device.upload(work, _body(work, i)).status_code == 201
        a._transitions(task_id, StepOutcome())
        assert db.round(task_id, 1).status == "aggregating"  # type: ignore[union-attr]

        first, second, _ = interleave(
            lambda: b._aggregate(task_id, StepOutcome()),
            lambda: a._aggregate(task_id, StepOutcome()),
            engine=replica.engine,
            pause_at=_statement_on("rounds"),
            observer=replica.engine,
        )
        first.unwrap()
        second.unwrap()
    rnd = db.round(task_id, 1)
    assert rnd is not None
    assert (rnd.status, rnd.result_version, rnd.status_reason) == ("closed", 1, None)
    assert db.task(task_id).current_version == 1
    assert _problems(db, task_id) == []


def _deadline_round(coordinator: Coordinator, db: Db, fleet: Fleet) -> tuple[int, dict, bytes]:
    """A sync round past its deadline with one upload in (quorum 1) and one device out;
    returns the task, the late device's work and its update."""
    stepper = TaskStepper(coordinator.app.state.runtime)
    task_id = create_task(
        coordinator,
        aggregation={
            "clients_per_round": 2,
            "over_selection": 0.0,
            "min_updates": 1,
            "round_deadline_s": 0.5,
            "max_staleness": 1,
            "num_rounds": 5,
        },
    )
    stepper.step(task_id)
    works = [d.work() for d in fleet]
    assert all(w is not None for w in works)
    assert fleet[0].upload(works[0], _body(works[0], 0)).status_code == 201  # type: ignore[arg-type]
    rnd = db.round(task_id, 1)
    assert rnd is not None and rnd.deadline_at is not None
    wait_until(lambda: utcnow() > rnd.deadline_at + timedelta(milliseconds=50))  # type: ignore[operator]
    late = works[1]
    assert late is not None
    return task_id, late, _body(late, 1)


@ON_POSTGRES
@pytest.mark.postgres
def test_a_drop_at_the_deadline_does_not_overwrite_an_upload(
    coordinator: Coordinator, db: Db, replica: Runtime
) -> None:
    """Case: the scheduler reads the late device's assignment as active, the upload commits,
    the scheduler then writes ``dropped`` over ``uploaded``."""
    with fleet_of(coordinator, 2) as fleet:
        task_id, late, body = _deadline_round(coordinator, db, fleet)
        stepper = TaskStepper(replica)
        first, second, _ = interleave(
            lambda: stepper._transitions(task_id, StepOutcome()),
            lambda: fleet[1].upload(late, body),
            engine=replica.engine,
            pause_at=_statement_on("assignments", has="assignments.status IN"),
            observer=replica.engine,
        )
        first.unwrap()
        assert second.unwrap().status_code == 201, second.unwrap().text
    status = {a.device_id: a.status for a in db.assignments(task_id)}
    assert status[fleet[1].device_id] == "uploaded"
    assert _problems(db, task_id) == []
    assert db.device(fleet[1].device_id).num_dropped == 0


@ON_POSTGRES
@pytest.mark.postgres
def test_an_upload_that_read_its_assignment_before_the_drop_takes_the_drop_back(
    coordinator: Coordinator, db: Db, replica: Runtime
) -> None:
    """Case: the upload reads the assignment as active, the scheduler drops it and commits,
    the upload then writes ``uploaded`` without taking the drop back (counters too high)."""
    server_engine = coordinator.app.state.runtime.engine
    with fleet_of(coordinator, 2) as fleet:
        task_id, late, body = _deadline_round(coordinator, db, fleet)
        stepper = TaskStepper(replica)
        first, second, _ = interleave(
            lambda: fleet[1].upload(late, body),
            lambda: stepper._transitions(task_id, StepOutcome()),
            engine=server_engine,
            pause_at=_statement_on("assignments", writing=True),
            observer=replica.engine,
            any_thread=True,
        )
        assert first.unwrap().status_code == 201, first.unwrap().text
        second.unwrap()
    rounds = db.rounds(task_id)
    assert rounds[0].status == "aggregating" and rounds[0].num_dropped == 0
    assert db.device(fleet[1].device_id).num_dropped == 0
    assert _problems(db, task_id) == []


# ------------------------------------------------------------------ stale async work


def _async_task(coordinator: Coordinator) -> int:
    return create_task(
        coordinator,
        aggregation={
            "mode": "async",
            "buffer_size": 1,
            "max_concurrency": 2,
            "max_staleness": 0,
            "lease_s": 30,
            "num_rounds": 10,
        },
    )


def test_an_update_refused_as_stale_ends_its_assignment(coordinator: Coordinator, db: Db) -> None:
    stepper = TaskStepper(coordinator.app.state.runtime)
    with fleet_of(coordinator, 2) as fleet:
        task_id = _async_task(coordinator)
        stepper.step(task_id)
        works = [d.work() for d in fleet]
        assert all(w is not None and w["base_version"] == 0 for w in works)
        assert fleet[0].upload(works[0], _body(works[0], 0)).status_code == 201  # type: ignore[arg-type]
        stepper._aggregate(task_id, StepOutcome())  # version 1, and nothing else yet
        assert db.task(task_id).current_version == 1

        r = fleet[1].upload(works[1], _body(works[1], 1))  # type: ignore[arg-type]
        assert (r.status_code, r.json()["error"]) == (409, "stale_update")
        assert "cancelled" in r.json()["detail"]
        mine = [a for a in db.assignments(task_id) if a.device_id == fleet[1].device_id]
        assert [a.status for a in mine] == ["cancelled"]
        assert db.updates(task_id)[-1].device_id == fleet[0].device_id  # nothing stored
        # The device gets new work on the current version, not the refused assignment again.
        again = fleet[1].work()
        assert again is not None
        assert again["assignment_id"] != works[1]["assignment_id"]  # type: ignore[index]
        assert again["base_version"] == 1
    assert db.device(fleet[1].device_id).num_dropped == 0
    assert _problems(db, task_id) == []


def test_work_that_can_only_be_refused_as_stale_is_cancelled(
    coordinator: Coordinator, db: Db
) -> None:
    stepper = TaskStepper(coordinator.app.state.runtime)
    with fleet_of(coordinator, 2) as fleet:
        task_id = _async_task(coordinator)
        stepper.step(task_id)
        works = [d.work() for d in fleet]
        assert fleet[0].upload(works[0], _body(works[0], 0)).status_code == 201  # type: ignore[arg-type]
        stepper.step(task_id)  # version 1
        stepper.step(task_id)  # the other device's work on version 0 is now doomed
        answer = fleet[1].work(current=works[1]["assignment_id"])  # type: ignore[index]
        assert answer is not None and answer["status"] == "cancelled"
        again = fleet[1].work()
        assert again is not None and again["base_version"] == 1
    assert _problems(db, task_id) == []
