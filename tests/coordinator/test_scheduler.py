"""The scheduler steps tasks independently and keeps a task's lease through a slow step.

An aggregation is made slow by the evaluation hook of tests/support/gate.py, which blocks
until the test opens it; the lease TTL is made short (0.3 s), so "several TTLs" pass in about
a second, and the tests wait on what the database shows, never for a fixed time."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from fedge.coordinator.app import create_app
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import leases
from fedge.coordinator.engine.notify import Notifier
from fedge.coordinator.engine.scheduler import Scheduler, StepOutcome, TaskStepper
from fedge.coordinator.models import Lease, ModelVersion
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.coordinator.conftest import Coordinator, make_key
from tests.support import gate as gate_module
from tests.support.gate import Gate
from tests.support.rounds import (
    Db,
    TestDevice,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)
from tests.support.servers import serve_in_thread

TTL_S = 0.3
#: One device per round, no deadline to speak of: the round aggregates on its one upload.
ONE_UPLOAD = {
    "clients_per_round": 1,
    "over_selection": 0.0,
    "min_updates": 1,
    "round_deadline_s": 600,
    "num_rounds": 3,
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"eval_hook": gate_module.SPEC, "lease_ttl_s": TTL_S})


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate_module.hook.reset()
    try:
        yield gate_module.hook
    finally:
        gate_module.hook.open()  # never leave a coordinator's shutdown waiting on it


def _upload_one(fleet: list[TestDevice], seed: int = 0) -> TestDevice:
    """Upload the work of the first device of ``fleet`` that has some (once one has)."""

    def assigned() -> tuple[TestDevice, dict[str, Any]] | None:
        for device in fleet:
            work = device.work()
            if work is not None:
                return device, work
        return None

    device, work = wait_until(assigned)
    delta = random_delta(spec_of(work), np.random.default_rng(seed))
    r = device.upload(work, make_update(work, delta=delta, num_examples=10))
    assert r.status_code == 201, r.text
    return device


def _lease(db: Db, task_id: int) -> Lease:
    name = leases.task_lease_name(task_id)
    row = db.read(lambda s: s.get(Lease, name))
    assert row is not None, f"no lease {name}"
    return row


def _versions(db: Db, task_id: int) -> list[int]:
    return db.read(
        lambda s: list(
            s.scalars(
                select(ModelVersion.version)
                .where(ModelVersion.task_id == task_id)
                .order_by(ModelVersion.version)
            )
        )
    )


def _assert_committed_once(db: Db, task_id: int) -> None:
    task = db.wait_task(task_id, lambda t: t.current_version == 1)
    assert task.current_version == 1
    assert _versions(db, task_id) == [0, 1]
    rnd = db.round(task_id, 1)
    assert rnd is not None
    assert (rnd.status, rnd.result_version) == ("closed", 1)
    assert [(u.status, u.applied_version) for u in db.updates(task_id)] == [("applied", 1)]


def test_a_slow_aggregation_keeps_its_lease(coordinator: Coordinator, db: Db, gate: Gate) -> None:
    """The aggregation stays blocked for several TTLs: the lease's expiry keeps moving
    forward, a second coordinator (its own holder name) steps the task all along without
    getting the lease, and the version is computed and committed once."""
    settings = coordinator.settings
    rival_runtime = Runtime.open(settings.model_copy(update={"instance_id": "rival"}))
    rival = TaskStepper(rival_runtime, hook=gate)  # computing would pass the gate too
    stop_rival = threading.Event()
    rival_steps = Counter[bool]()

    def rival_loop(task_id: int) -> None:
        while not stop_rival.is_set():
            rival_steps[rival.step(task_id).aggregated] += 1
            stop_rival.wait(0.02)

    try:
        with fleet_of(coordinator, 1) as fleet:
            task_id = create_task(coordinator, aggregation=ONE_UPLOAD)
            _upload_one(fleet)
            assert gate.entered.wait(20), "the aggregation never reached the hook"
            first = _lease(db, task_id)
            assert first.holder == settings.instance_id
            thread = threading.Thread(target=rival_loop, args=(task_id,), daemon=True)
            thread.start()
            grabbed: list[bool] = []

            def expiry_moved_past_several_ttls() -> bool:
                with session_scope(rival_runtime.sessions) as session:
                    grabbed.append(
                        leases.acquire(
                            session,
                            leases.task_lease_name(task_id),
                            holder="rival-direct",
                            ttl_s=TTL_S,
                            now=utcnow(),
                        )
                    )
                row = _lease(db, task_id)
                assert row.holder == settings.instance_id
                return row.expires_at > first.expires_at + timedelta(seconds=4 * TTL_S)

            wait_until(expiry_moved_past_several_ttls, timeout=20)
            stop_rival.set()
            thread.join(10)
            assert not any(grabbed)
            assert rival_steps[True] == 0 and rival_steps[False] > 0
            assert gate.calls == 1 and gate.inside == 1  # still blocked, computed once
            assert db.task(task_id).current_version == 0
            gate.open()
            _assert_committed_once(db, task_id)
            assert gate.calls == 1
            assert _lease(db, task_id).holder == settings.instance_id
    finally:
        stop_rival.set()
        rival_runtime.close()


def test_a_lease_taken_over_mid_aggregation_is_logged_and_the_commit_stays_single(
    coordinator: Coordinator, db: Db, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """Another holder takes the lease while the aggregation is blocked (as after a pause
    longer than the TTL): the renewal notices and logs it, the aggregation's commit is still
    checked against the task's version and lands once."""
    caplog.set_level(logging.WARNING, logger=leases.log.name)
    with fleet_of(coordinator, 1) as fleet:
        task_id = create_task(coordinator, aggregation=ONE_UPLOAD)
        _upload_one(fleet)
        assert gate.entered.wait(20)
        name = leases.task_lease_name(task_id)
        with session_scope(db.sessions) as session:
            session.execute(
                update(Lease)
                .where(Lease.name == name)
                .values(holder="intruder", expires_at=utcnow() + timedelta(seconds=600))
            )
        wait_until(
            lambda: any(
                "taken over" in r.getMessage() and name in r.getMessage() for r in caplog.records
            )
        )
        gate.open()
        _assert_committed_once(db, task_id)
        assert gate.calls == 1
        assert _lease(db, task_id).holder == "intruder"  # a renewal never takes a lease back


def test_tasks_are_stepped_independently(
    coordinator: Coordinator, db: Db, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While task A's aggregation is blocked, task B's round passes its deadline, is failed
    (its assignment dropped) and B's next round opens; A is never stepped twice at once."""
    scheduler = coordinator.app.state.runtime.scheduler
    assert scheduler is not None
    inner = scheduler.stepper.step
    lock = threading.Lock()
    inside: Counter[int] = Counter()
    most: Counter[int] = Counter()
    calls: Counter[int] = Counter()

    def tracked(task_id: int) -> StepOutcome:
        with lock:
            calls[task_id] += 1
            inside[task_id] += 1
            most[task_id] = max(most[task_id], inside[task_id])
        try:
            return inner(task_id)
        finally:
            with lock:
                inside[task_id] -= 1

    monkeypatch.setattr(scheduler.stepper, "step", tracked)
    with fleet_of(coordinator, 2) as fleet:
        a = create_task(coordinator, aggregation=ONE_UPLOAD)
        _upload_one(fleet)
        assert gate.entered.wait(20)
        with lock:
            a_steps = calls[a]
        b = create_task(coordinator, aggregation={**ONE_UPLOAD, "round_deadline_s": 0.3})

        def b_moved_on() -> bool:
            first, second = db.round(b, 1), db.round(b, 2)
            return first is not None and first.status == "failed" and second is not None

        wait_until(b_moved_on, timeout=20)
        assert gate.inside == 1, "task B waited for task A's aggregation"
        rounds = db.rounds(b)
        assert rounds[0].status_reason is not None and "deadline" in rounds[0].status_reason
        first_round = [x for x in db.assignments(b) if x.round_id == rounds[0].id]
        assert first_round and all(x.status == "dropped" for x in first_round)
        rnd_a = db.round(a, 1)
        assert rnd_a is not None and rnd_a.status == "aggregating"
        with lock:
            assert calls[a] == a_steps, "task A was stepped again while its step ran"
            assert calls[b] > 2
        gate.open()
        _assert_committed_once(db, a)
    assert set(most.values()) == {1}


@pytest.fixture
def serve(settings: Settings, tls_paths: TlsPaths) -> Iterator[Callable[..., Coordinator]]:
    """Start a coordinator with some settings changed (stopped at the end of the test)."""
    with ExitStack() as stack:

        def start(**changes: Any) -> Coordinator:
            own = settings.model_copy(update=changes)
            app = create_app(own)
            keys = make_key(own, "admin"), make_key(own, "viewer")
            url = stack.enter_context(
                serve_in_thread(app, certfile=own.tls_cert, keyfile=own.tls_key)
            )
            return Coordinator(url, own, app, tls_paths.ca_cert, *keys)

        yield start


def test_an_upload_that_completes_a_round_kicks_the_scheduler(
    serve: Callable[..., Coordinator], db: Db, gate: Gate
) -> None:
    """With ticks a minute apart, the round that an upload completes still closes and
    aggregates at once."""
    gate.open()
    server = serve(scheduler_interval_s=60.0)
    with fleet_of(server, 1) as fleet:
        task_id = create_task(server, aggregation=ONE_UPLOAD)  # starting it kicks too
        _upload_one(fleet)
        _assert_committed_once(db, task_id)


def test_stop_waits_for_the_running_step_then_releases_the_leases(
    serve: Callable[..., Coordinator], db: Db, gate: Gate
) -> None:
    """Stopping a scheduler while an aggregation runs waits for that step (its commit
    lands), then hands the process's leases back."""
    server = serve(scheduler_enabled=False)
    runtime = Runtime.open(server.settings)
    try:
        with fleet_of(server, 1) as fleet:
            task_id = create_task(server, aggregation=ONE_UPLOAD)

            async def main() -> bool:
                scheduler = Scheduler(runtime, Notifier(asyncio.get_running_loop()))
                scheduler.start()
                await asyncio.to_thread(_upload_one, fleet)
                assert await asyncio.to_thread(gate.entered.wait, 20)
                stopping = asyncio.create_task(scheduler.stop())
                done, _ = await asyncio.wait({stopping}, timeout=3 * TTL_S)
                assert _lease(db, task_id).holder == server.settings.instance_id
                gate.open()
                await stopping
                assert scheduler.running == set()
                return not done

            assert asyncio.run(main()), "stop did not wait for the running step"
    finally:
        runtime.close()
    _assert_committed_once(db, task_id)
    assert db.read(lambda s: s.get(Lease, leases.task_lease_name(task_id))) is None


def test_steps_soon_after_taking_the_lease_write_nothing_for_it(settings: Settings, db: Db) -> None:
    """A stepper that took a task's lease less than a third of its TTL ago steps the task
    without writing the lease again (a busy task's steps do not each commit for it); later
    it takes it again, and a lease another holder took is never assumed."""
    runtime = Runtime.open(settings.model_copy(update={"lease_ttl_s": 600.0}))
    try:
        stepper = TaskStepper(runtime)
        coordinator_free_task = 10_000  # no such task: a step only takes the lease
        name = leases.task_lease_name(coordinator_free_task)
        stepper.step(coordinator_free_task)
        taken = db.read(lambda s: s.get(Lease, name))
        assert taken is not None and taken.holder == settings.instance_id
        for _ in range(3):
            stepper.step(coordinator_free_task)
        again = db.read(lambda s: s.get(Lease, name))
        assert again is not None and again.expires_at == taken.expires_at  # not rewritten

        # A third of the TTL later (the stepper's clock moved back by that much) it renews.
        stepper._acquired_at[coordinator_free_task] -= 200.0
        stepper.step(coordinator_free_task)
        renewed = db.read(lambda s: s.get(Lease, name))
        assert renewed is not None and renewed.expires_at > taken.expires_at

        # Lost to another holder (expired, then taken): the stepper finds out when its
        # cached third runs out and does not step the task.
        with session_scope(runtime.sessions) as session:
            session.execute(
                update(Lease)
                .where(Lease.name == name)
                .values(holder="rival", expires_at=utcnow() + timedelta(seconds=600))
            )
        stepper._acquired_at[coordinator_free_task] -= 200.0
        assert not stepper._holds_lease(coordinator_free_task, name)
        assert db.read(lambda s: s.get(Lease, name)).holder == "rival"  # type: ignore[union-attr]
    finally:
        runtime.close()
