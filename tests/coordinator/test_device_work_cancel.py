"""Cancellation reaches a waiting device at once; devices only act on their own work."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedge.coordinator.engine.notify import Notifier
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    Db,
    action,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

LONG_WAIT = 30


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A re-check period as long as the poll: only the in-process signal can end it early.
    return settings.model_copy(update={"long_poll_recheck_s": float(LONG_WAIT)})


def _notifier(coordinator: Coordinator) -> Notifier:
    notifier = coordinator.app.state.runtime.notifier
    assert isinstance(notifier, Notifier)
    return notifier


@pytest.mark.parametrize("trigger", ["round_closed", "task_paused", "task_cancelled"])
def test_a_cancelled_devices_long_poll_returns_at_once(
    coordinator: Coordinator, db: Db, trigger: str
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 1,
                "over_selection": 1.0,
                "min_updates": 1,
                "round_deadline_s": 600,
            },
        )
        # Without `current`, a device waiting for work is woken when the round opens.
        first, second = (d.work(wait=LONG_WAIT) for d in fleet)
        assert first is not None and second is not None
        with ThreadPoolExecutor(max_workers=1) as pool:
            started = time.monotonic()
            poll = pool.submit(fleet[1].work, wait=LONG_WAIT, current=second["assignment_id"])
            wait_until(lambda: _notifier(coordinator).waiting(fleet[1].device_id) == 1)
            if trigger == "round_closed":
                body = make_update(
                    first,
                    delta=random_delta(spec_of(first), np.random.default_rng(0)),
                    num_examples=5,
                )
                assert fleet[0].upload(first, body).status_code == 201
            else:
                action(coordinator, task_id, "pause" if trigger == "task_paused" else "cancel")
            answer = poll.result(timeout=LONG_WAIT)
            elapsed = time.monotonic() - started
        assert answer is not None
        assert (answer["assignment_id"], answer["status"]) == (second["assignment_id"], "cancelled")
        assert elapsed < LONG_WAIT / 3
        statuses = {
            a.device_id: a.status
            for a in db.assignments(task_id)
            if a.round_id == second["round_id"]
        }
        assert statuses[fleet[1].device_id] == "cancelled"
        rnd = db.round(task_id, 1)
        assert rnd is not None
        if trigger == "round_closed":
            assert rnd.status == "closed" and rnd.num_dropped == 0
        elif trigger == "task_paused":
            # A paused task keeps its round but opens none and hands out no work.
            assert rnd.status == "open"
            assert fleet[0].work(wait=0) is None
            assert db.round(task_id, 2) is None
        else:
            assert rnd.status == "failed" and "cancelled" in (rnd.status_reason or "")


def test_a_device_cannot_act_on_another_devices_assignment(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={"clients_per_round": 1, "over_selection": 0.0, "min_updates": 1},
        )
        db.wait_round(task_id, 1)
        works = [d.work(wait=0) for d in fleet]
        owner = 0 if works[0] is not None else 1
        work = works[owner]
        assert work is not None
        other = fleet[1 - owner]
        body = make_update(
            work, delta=random_delta(spec_of(work), np.random.default_rng(1)), num_examples=3
        )
        r = other.upload(work, body)
        assert r.status_code == 403
        assert r.json()["error"] == "not_your_assignment"
        r = other.metrics(work["assignment_id"], train_loss=0.5)
        assert (r.status_code, r.json()["error"]) == (403, "not_your_assignment")
        r = other.get(f"{API}/device/work", params={"current": work["assignment_id"]})
        assert (r.status_code, r.json()["error"]) == (403, "not_your_assignment")
        assert db.updates(work["task_id"]) == []
        # Unknown assignments are 404 for everyone.
        r = other.post(
            f"{API}/device/assignments/999999/update",
            content=body,
            headers={"Idempotency-Key": "k"},
        )
        assert (r.status_code, r.json()["error"]) == (404, "not_found")
        # The owner still can.
        assert fleet[owner].upload(work, body).status_code == 201


def test_a_device_revoked_while_waiting_for_work_is_refused_at_once(
    coordinator: Coordinator,
) -> None:
    with fleet_of(coordinator, 1) as fleet, ThreadPoolExecutor(max_workers=1) as pool:
        device = fleet[0]
        started = time.monotonic()
        poll = pool.submit(device.get, f"{API}/device/work", params={"wait": LONG_WAIT})
        wait_until(lambda: _notifier(coordinator).waiting(device.device_id) == 1)
        with coordinator.admin() as admin:
            assert admin.post(f"{API}/devices/{device.device_id}/revoke").status_code == 200
        r = poll.result(timeout=LONG_WAIT)
        assert time.monotonic() - started < LONG_WAIT / 3
    assert (r.status_code, r.json()["error"]) == (403, "device_revoked")
