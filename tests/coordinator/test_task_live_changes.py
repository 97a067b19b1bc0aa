"""Changing a live task's training settings (applied from its next round) and the warnings
about settings that can never take effect, through the admin API of a running coordinator."""

from __future__ import annotations

import numpy as np

from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    Db,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
)


def test_training_changes_on_a_running_task_apply_from_its_next_round(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 1) as (device,), coordinator.admin() as admin:
        task_id = create_task(coordinator, aggregation=every_device(1, rounds=3))
        work = device.work(wait=10)
        assert work is not None and work["training"]["lr"] == 0.1

        r = admin.patch(f"{API}/tasks/{task_id}", json={"training": {"lr": 0.05, "epochs": 2}})
        assert r.status_code == 200, r.text
        task = r.json()
        assert task["training"]["lr"] == 0.1 and task["training"]["epochs"] == 1
        assert task["pending_training"]["lr"] == 0.05
        assert task["pending_training"]["epochs"] == 2
        # The open round keeps the settings its devices were given.
        again = device.work(wait=0)
        assert again is not None and again["assignment_id"] == work["assignment_id"]
        assert again["training"]["lr"] == 0.1

        rng = np.random.default_rng(3)
        body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=8)
        assert device.upload(work, body).status_code == 201
        db.wait_round(task_id, 1, closed=True)
        nxt = device.work(wait=10)
        assert nxt is not None and nxt["base_version"] == 1
        assert (nxt["training"]["lr"], nxt["training"]["epochs"]) == (0.05, 2)
        task = admin.get(f"{API}/tasks/{task_id}").json()
        assert task["training"]["lr"] == 0.05 and task["pending_training"] is None


# What the scheduler writes on its own while a started task waits for devices (the reason it
# waits, and the time of that write): not settings, and not changed by a refused PATCH.
SCHEDULER_FIELDS = frozenset({"updated_at", "status_reason"})


def _settings(task: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in task.items() if k not in SCHEDULER_FIELDS}


def test_a_live_task_refuses_other_changes_and_bad_values_and_keeps_its_settings(
    coordinator: Coordinator,
) -> None:
    task_id = create_task(coordinator, aggregation=every_device(1, rounds=3))
    with coordinator.admin() as admin:
        before = _settings(admin.get(f"{API}/tasks/{task_id}").json())
        cases = [
            ({"aggregation": {"num_rounds": 9}}, 409, "task_not_draft", "aggregation"),
            ({"training": {"trainer": "mlp"}}, 409, "task_not_draft", "training.trainer"),
            ({"training": {}}, 409, "task_not_draft", "lr, epochs"),
            ({"training": {"lr": -1}}, 422, "validation_error", "training.lr"),
            ({"training": {"epochs": 0}}, 422, "validation_error", "training.epochs"),
        ]
        for body, status, code, named in cases:
            r = admin.patch(f"{API}/tasks/{task_id}", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"] == code and named in r.json()["detail"], (body, r.text)
        assert _settings(admin.get(f"{API}/tasks/{task_id}").json()) == before
        admin.post(f"{API}/tasks/{task_id}/pause").raise_for_status()
        r = admin.patch(f"{API}/tasks/{task_id}", json={"training": {"batch_size": 4}})
        assert r.status_code == 200 and r.json()["pending_training"]["batch_size"] == 4
        admin.post(f"{API}/tasks/{task_id}/cancel").raise_for_status()
        r = admin.patch(f"{API}/tasks/{task_id}", json={"training": {"lr": 0.2}})
        assert (r.status_code, r.json()["error"]) == (409, "task_not_draft")


def test_unreachable_targets_are_warned_at_creation_and_given_as_the_reason_while_running(
    coordinator: Coordinator,
) -> None:
    assert not coordinator.settings.eval_hook
    with coordinator.admin() as admin:
        plain = admin.post(
            f"{API}/tasks",
            json={
                "name": "plain",
                "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
            },
        ).json()
        assert plain["warnings"] == []
        r = admin.post(
            f"{API}/tasks",
            json={
                "name": "target",
                "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
                "aggregation": {"target_metric": {"name": "accuracy", "value": 95}},
            },
        )
        assert r.status_code == 201, r.text
        task = r.json()
        hook, scale = task["warnings"]
        assert "target_metric 'accuracy'" in hook and "FEDGE_EVAL_HOOK" in hook
        assert "fraction in [0, 1]" in scale
        started = admin.post(f"{API}/tasks/{task['id']}/start").json()
        assert started["status"] == "running"
        assert started["status_reason"].startswith("warning: ")
        assert "FEDGE_EVAL_HOOK" in started["status_reason"]
        assert admin.get(f"{API}/tasks/{task['id']}").json()["warnings"] == task["warnings"]

        # A quorum larger than the round can never be met: refused outright, naming both.
        r = admin.post(
            f"{API}/tasks",
            json={
                "name": "quorum",
                "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
                "aggregation": {"clients_per_round": 2, "min_updates": 3},
            },
        )
        assert r.status_code == 422
        assert "min_updates (3)" in r.json()["detail"]
        assert "clients_per_round (2)" in r.json()["detail"]
