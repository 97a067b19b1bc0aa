"""One request per update: an upload sent with ``next=1`` is answered with the device's next
assignment when one is there at once (``next``), with ``have`` also the delta chain to its base
model (a work frame), and with ``known`` without the configuration the device holds.

And the scheduler is asked for a step only by an upload that may let the round close: an
upload that leaves an async buffer short of ``buffer_size`` does not kick it.

The scheduler is disabled in the first tests (the test steps the engine itself, so it knows
when the version moves); the kick test runs it with a period far longer than the test."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event

from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.errors import Conflict
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.shared.broadcast import rebuild
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import decode_model
from fedge.shared.wire_delta import WORK_FRAME_MEDIA_TYPE, decode_work_frame
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    EXACT,
    Db,
    Fleet,
    TestDevice,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

MODEL = {"architecture": "softmax", "input_dim": 64, "num_classes": 10}
DOWNLOAD = {"topk_fraction": 0.1, "bits": 8, "chunk": 64}
ASYNC = {
    "mode": "async",
    "buffer_size": 1,
    "max_concurrency": 4,
    "max_staleness": 4,
    "num_rounds": 10,
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


def _stepper(coordinator: Coordinator) -> TaskStepper:
    runtime: Runtime = coordinator.app.state.runtime
    return TaskStepper(runtime)


def _upload(
    device: TestDevice, work: dict[str, Any], rng: np.random.Generator, **params: Any
) -> Any:
    body = make_update(work, delta=random_delta(spec_of(work), rng, 0.05), num_examples=5)
    return device.post(
        work["upload_url"],
        content=body,
        params=params,
        headers={"Idempotency-Key": f"k{work['assignment_id']}", "Prefer": "return=minimal"},
    )


def test_an_upload_asking_for_next_work_gets_it_when_there_is_some(
    coordinator: Coordinator, db: Db
) -> None:
    stepper = _stepper(coordinator)
    rng = np.random.default_rng(1)
    with fleet_of(coordinator, 3) as fleet:
        a, b, c = fleet
        task_id = create_task(coordinator, aggregation=ASYNC, model=MODEL)
        stepper.step(task_id)
        work_a, work_b, work_c = a.work(), b.work(), c.work()
        assert work_a and work_b and work_c

        # A fills the buffer: nothing new for it before the version moves (a device works
        # once per version), so the answer carries no `next`.
        r = _upload(a, work_a, rng, next=1)
        assert r.status_code == 201, r.text
        assert r.headers["content-type"] == "application/json"
        assert "next" not in r.json() and set(r.json()) == {"update_id", "staleness", "duplicate"}
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        stepper.step(task_id)  # the round of version 1 opens

        # B uploads its (now stale) update and gets work on version 1 in the same answer.
        r = _upload(b, work_b, rng, next=1)
        assert r.status_code == 201, r.text
        answer = r.json()
        assert answer["staleness"] == 1
        following = answer["next"]
        assert (following["status"], following["base_version"]) == ("assigned", 1)
        assert following["task_id"] == task_id and following["mode"] == "async"
        assert following["spec"] and following["config_digest"] == work_b["config_digest"]
        mine = [x for x in db.assignments(task_id) if x.device_id == b.device_id]
        assert [(x.base_version, x.status) for x in mine] == [(0, "uploaded"), (1, "assigned")]
        # The work poll answers the same assignment: it is the device's active one.
        polled = b.work()
        assert polled is not None and polled["assignment_id"] == following["assignment_id"]

        # Without `next=1` the answer carries none, even with work there (C gets it by poll).
        r = _upload(c, work_c, rng)
        assert r.status_code == 201 and "next" not in r.json()
        polled = c.work()
        assert polled is not None and polled["base_version"] == 1


def test_next_work_leaves_out_a_known_configuration_and_carries_the_chain(
    coordinator: Coordinator, db: Db
) -> None:
    stepper = _stepper(coordinator)
    rng = np.random.default_rng(2)
    with fleet_of(coordinator, 3) as fleet:
        a, b, c = fleet
        task_id = create_task(
            coordinator,
            aggregation=ASYNC,
            compression={**EXACT, "download": DOWNLOAD},
            model=MODEL,
        )
        spec = ModelSpec.from_dict(db.task(task_id).model_spec)
        stepper.step(task_id)
        work_a, work_b, work_c = a.work(), b.work(), c.work()
        assert work_a and work_b and work_c
        r = a.get(f"{API}/device/tasks/{task_id}/models/0")
        v0 = decode_model(r.content, spec=spec)
        assert _upload(a, work_a, rng).status_code == 201
        stepper.step(task_id)
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1

        r = _upload(b, work_b, rng, next=1, known=work_b["config_digest"])
        following = r.json()["next"]
        assert following["base_version"] == 1 and following["config_digest"]
        assert not {"spec", "model", "training", "compression"} & set(following)

        r = _upload(c, work_c, rng, next=1, known=work_c["config_digest"], have=f"{task_id}.0")
        assert r.status_code == 201, r.text
        assert r.headers["content-type"] == WORK_FRAME_MEDIA_TYPE
        answer, chain = decode_work_frame(r.content)
        receipt = json.loads(answer)
        assert receipt["staleness"] == 1 and receipt["duplicate"] is False
        following = receipt["next"]
        assert (following["base_version"], following["model_delta_from"]) == (1, 0)
        rebuilt = rebuild(v0, chain, spec, task_id=task_id, have=0, want=1)
        served = db.version(task_id, 1)
        assert served is not None
        expected = decode_model(db.blobs.get(served.served_digest))
        assert all(rebuilt[n].tobytes() == expected[n].tobytes() for n in spec.names)
        (assignment,) = [x for x in db.assignments(task_id) if x.id == following["assignment_id"]]
        assert assignment.status == "downloaded"


def test_a_refused_upload_asks_nothing_and_bad_parameters_are_refused(
    coordinator: Coordinator, db: Db
) -> None:
    stepper = _stepper(coordinator)
    rng = np.random.default_rng(3)
    with fleet_of(coordinator, 1) as fleet:
        (a,) = fleet
        task_id = create_task(coordinator, aggregation=ASYNC, model=MODEL)
        stepper.step(task_id)
        work = a.work()
        assert work is not None
        r = _upload(a, work, rng, next=1, have="1-0")
        assert r.status_code == 422 and r.json()["error"] == "validation_error"
        r = a.post(
            work["upload_url"],
            content=b"not an update",
            params={"next": 1},
            headers={"Idempotency-Key": "bad"},
        )
        assert r.status_code == 400 and "error" in r.json()
        assert db.updates(task_id) == []
        assert [x.status for x in db.assignments(task_id)] == ["assigned"]


class TestKick:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        # The periodic tick would step the task anyway: make it far longer than the test.
        return settings.model_copy(
            update={"scheduler_enabled": True, "scheduler_interval_s": 3600.0}
        )

    def test_only_an_upload_that_fills_the_buffer_asks_for_a_step(
        self, coordinator: Coordinator, db: Db
    ) -> None:
        rng = np.random.default_rng(4)
        runtime: Runtime = coordinator.app.state.runtime
        scheduler = runtime.scheduler
        assert scheduler is not None
        with fleet_of(coordinator, 3) as fleet:
            task_id = create_task(coordinator, aggregation={**ASYNC, "buffer_size": 3}, model=MODEL)
            works = [wait_until(lambda d=d: d.work()) for d in fleet]  # type: ignore[misc]
            kicks = scheduler._kicks
            for device, work in zip(fleet[:2], works[:2], strict=True):
                assert _upload(device, work, rng).status_code == 201
            assert scheduler._kicks == kicks  # two of three: no step asked for
            assert db.task(task_id).current_version == 0
            assert _upload(fleet[2], works[2], rng).status_code == 201
            assert scheduler._kicks == kicks + 1
            # The step it asked for aggregates at once, not at the next periodic tick.
            wait_until(lambda: db.task(task_id).current_version == 1, timeout=20)


class TestWakeIdle:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        # Neither the periodic tick nor a poll's own re-check comes within the test.
        return settings.model_copy(
            update={
                "scheduler_enabled": True,
                "scheduler_interval_s": 3600.0,
                "long_poll_recheck_s": 3600.0,
            }
        )

    def test_a_new_async_version_wakes_a_waiting_idle_device_at_once(
        self, coordinator: Coordinator, db: Db
    ) -> None:
        rng = np.random.default_rng(5)
        runtime: Runtime = coordinator.app.state.runtime
        notifier = runtime.notifier
        assert notifier is not None
        with fleet_of(coordinator, 2) as fleet:
            a, b = fleet
            task_id = create_task(coordinator, aggregation={**ASYNC, "buffer_size": 2}, model=MODEL)
            work_a = wait_until(a.work)
            work_b = wait_until(b.work)
            assert _upload(b, work_b, rng).status_code == 201
            # B worked on version 0: its poll waits (nothing for it before version 1).
            answer: list[Any] = []
            poll = threading.Thread(target=lambda: answer.append(b.work(wait=30)))
            poll.start()
            wait_until(lambda: notifier.waiting(b.device_id) == 1)
            assert _upload(a, work_a, rng).status_code == 201  # fills the buffer
            poll.join(25)
            assert not poll.is_alive(), "the waiting poll was not woken by the new version"
            (found,) = answer
            assert found is not None and found["base_version"] == 1
            assert db.task(task_id).current_version == 1


def test_a_device_that_worked_on_the_open_round_is_answered_without_writes(
    coordinator: Coordinator, db: Db
) -> None:
    """Right after its upload, until the version moves, a device can get no new assignment
    of the task: the upload's `next` and a work poll find that with one read, and neither
    inserts an assignment nor writes the device's assignment counter (the device's
    `last_seen_at` is still written by the poll); once the version moves, it gets work."""
    from sqlalchemy import event

    stepper = _stepper(coordinator)
    rng = np.random.default_rng(3)
    engine = coordinator.app.state.runtime.engine
    writes: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        text = " ".join(statement.split()).lower()
        if text.startswith("insert into assignments") or "num_assigned" in text:
            writes.append(text)

    with fleet_of(coordinator, 2) as fleet:
        a, b = fleet
        task_id = create_task(coordinator, aggregation={**ASYNC, "buffer_size": 2}, model=MODEL)
        stepper.step(task_id)
        work_a, work_b = a.work(), b.work()
        assert work_a and work_b
        event.listen(engine, "before_cursor_execute", record)
        try:
            r = _upload(a, work_a, rng, next=1)
            assert r.status_code == 201 and "next" not in r.json()
            seen_before = db.device(a.device_id).last_seen_at
            assert a.work() is None
            assert db.device(a.device_id).last_seen_at > seen_before
            assert writes == []
            stepper.step(task_id)  # one update of two: the version stays
            assert a.work() is None and writes == []
            # B fills the buffer, the version moves, and A gets work on it (one insert).
            assert _upload(b, work_b, rng).status_code == 201
            stepper.step(task_id)
            stepper.step(task_id)
            assert db.task(task_id).current_version == 1
            following = a.work()
            assert following is not None and following["base_version"] == 1
            assert sum(w.startswith("insert into assignments") for w in writes) == 1
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert db.device(a.device_id).num_assigned == 2


def _commits(coordinator: Coordinator) -> list[int]:
    """A counter of the coordinator engine's commits (one entry per commit)."""
    runtime: Runtime = coordinator.app.state.runtime
    seen: list[int] = []
    event.listen(runtime.engine, "commit", lambda conn: seen.append(1))
    return seen


def _b_behind_version_1(
    coordinator: Coordinator, db: Db, fleet: Fleet, rng: np.random.Generator
) -> tuple[int, TestDevice, dict[str, Any]]:
    """An async task whose version 1 came from A's update while B still works on version 0:
    the task id, B and B's assignment (B's upload with ``next=1`` finds work on version 1)."""
    stepper = _stepper(coordinator)
    a, b = fleet
    task_id = create_task(coordinator, aggregation=ASYNC, model=MODEL)
    stepper.step(task_id)
    work_a, work_b = a.work(), b.work()
    assert work_a and work_b
    assert _upload(a, work_a, rng).status_code == 201
    stepper.step(task_id)
    stepper.step(task_id)  # the round of version 1 opens
    assert db.task(task_id).current_version == 1
    return task_id, b, work_b


def test_on_sqlite_the_next_assignment_commits_with_the_upload(
    coordinator: Coordinator, db: Db
) -> None:
    """One write transaction for the upload and the next assignment on SQLite (the database
    has one write lock); two on PostgreSQL (the upload holds the task row FOR SHARE, an
    assignment takes it in another order)."""
    rng = np.random.default_rng(5)
    sqlite = db.engine.dialect.name == "sqlite"
    with fleet_of(coordinator, 2) as fleet:
        task_id, b, work_b = _b_behind_version_1(coordinator, db, fleet, rng)
        commits = _commits(coordinator)
        r = _upload(b, work_b, rng, next=1)
        assert r.status_code == 201, r.text
        following = r.json()["next"]
        assert (following["status"], following["base_version"]) == ("assigned", 1)
        assert len(commits) == (1 if sqlite else 2)
        mine = [x for x in db.assignments(task_id) if x.device_id == b.device_id]
        assert [(x.base_version, x.status) for x in mine] == [(0, "uploaded"), (1, "assigned")]


def test_a_failing_next_assignment_keeps_the_upload_and_only_undoes_its_own_writes(
    coordinator: Coordinator, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next assignment fails after it wrote its assignment row: the upload is committed
    (a repeat of it answers the first result) and the request is answered with the error. On
    SQLite the savepoint undid the assignment; on PostgreSQL it was a transaction of its own,
    committed before the failure, as before."""
    from fedge.coordinator.api import device_work

    rng = np.random.default_rng(6)
    with fleet_of(coordinator, 2) as fleet:
        task_id, b, work_b = _b_behind_version_1(coordinator, db, fleet, rng)
        real = device_work.find_work
        found: list[dict[str, Any] | None] = []

        def find_then_fail(conn: Any, *args: Any, **kwargs: Any) -> Any:
            found.append(real(conn, *args, **kwargs))  # writes the new assignment
            # An answered error: after an unhandled one (a 500) the server closes the
            # connection, and the device's next request would meet a closed socket.
            raise Conflict("next assignment failed", code="next_failed")

        monkeypatch.setattr(device_work, "find_work", find_then_fail)

        def next_then_fail(runtime: Runtime, device_id: str) -> Any:  # PostgreSQL's way
            found.append(real_next(runtime, device_id))  # commits the new assignment
            raise Conflict("next assignment failed", code="next_failed")

        real_next = device_work.next_assignment
        monkeypatch.setattr(device_work, "next_assignment", next_then_fail)
        failed = _upload(b, work_b, rng, next=1)
        assert failed.status_code == 409
        assert failed.json() == {"error": "next_failed", "detail": "next assignment failed"}
        assert len(found) == 1 and found[0] is not None and found[0]["base_version"] == 1
        mine = [
            (x.base_version, x.status)
            for x in db.assignments(task_id)
            if x.device_id == b.device_id
        ]
        if db.engine.dialect.name == "sqlite":  # the savepoint undid the assignment
            assert mine == [(0, "uploaded")]
        else:  # a transaction of its own, committed before the failure
            assert mine == [(0, "uploaded"), (1, "assigned")]
        monkeypatch.setattr(device_work, "find_work", real)
        again = _upload(b, work_b, rng)  # the same Idempotency-Key: the first result
        assert again.status_code == 200 and again.json()["duplicate"] is True
