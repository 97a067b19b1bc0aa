"""The compression policy's error-feedback fields (momentum, warmup_rounds, residual_decay)
through the admin API: defaults, round trip, draft edits, and a 422 naming the field for every
bad value (a real HTTPS coordinator, as in test_api_tasks.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from fedge.coordinator.models import Task
from fedge.shared.policy import CompressionPolicy
from tests.support.device import API
from tests.support.rows import db_session

SOFTMAX = {"architecture": "softmax", "input_dim": 8, "num_classes": 3, "seed": 7}
FIELDS = {"momentum": 0.9, "warmup_rounds": 4, "residual_decay": 0.5}


def create(admin, **compression: Any):
    return admin.post(
        f"{API}/tasks", json={"name": "t", "model": SOFTMAX, "compression": compression}
    )


def tasks(settings) -> int:
    with db_session(settings) as s:
        return int(s.scalar(select(func.count()).select_from(Task)) or 0)


def test_defaults_are_plain_error_feedback_and_fields_round_trip(coordinator):
    with coordinator.admin() as admin:
        plain = create(admin)
        assert plain.status_code == 201, plain.text
        compression = plain.json()["compression"]
        assert (
            compression["momentum"],
            compression["warmup_rounds"],
            compression["residual_decay"],
        ) == (0.0, 0, 1.0)
        r = create(admin, topk_fraction=0.02, **FIELDS)
        assert r.status_code == 201, r.text
        task = r.json()
        assert admin.get(f"{API}/tasks/{task['id']}").json()["compression"] == task["compression"]
    assert {k: task["compression"][k] for k in FIELDS} == FIELDS
    # what devices are handed builds the same policy
    policy = CompressionPolicy.from_dict(task["compression"])
    assert (policy.momentum, policy.warmup_rounds, policy.residual_decay) == (0.9, 4, 0.5)
    with db_session(coordinator.settings) as s:
        row = s.get(Task, task["id"])
        assert row is not None
        assert CompressionPolicy.from_dict(row.compression) == policy


def test_a_draft_takes_the_fields_in_a_patch(coordinator):
    with coordinator.admin() as admin:
        task = create(admin).json()
        r = admin.patch(f"{API}/tasks/{task['id']}", json={"compression": {"momentum": 0.5}})
        assert r.status_code == 200, r.text
        assert r.json()["compression"]["momentum"] == 0.5
        assert r.json()["compression"]["warmup_rounds"] == 0  # kept


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"momentum": 1.0}, "compression.momentum"),
    ({"momentum": -0.1}, "compression.momentum"),
    ({"momentum": "0.9"}, "compression.momentum"),
    ({"momentum": True}, "compression.momentum"),
    ({"momentum": None}, "compression.momentum"),
    ({"warmup_rounds": -1}, "compression.warmup_rounds"),
    ({"warmup_rounds": 100_001}, "compression.warmup_rounds"),
    ({"warmup_rounds": 2.5}, "compression.warmup_rounds"),
    ({"warmup_rounds": "4"}, "compression.warmup_rounds"),
    ({"warmup_rounds": True}, "compression.warmup_rounds"),
    ({"residual_decay": 0}, "compression.residual_decay"),
    ({"residual_decay": 1.01}, "compression.residual_decay"),
    ({"residual_decay": "half"}, "compression.residual_decay"),
    ({"residual_decay": [0.5]}, "compression.residual_decay"),
    ({"momentum": 0.9, "error_feedback": False}, "momentum needs error_feedback"),
    ({"residual_decay": 0.5, "error_feedback": False}, "residual_decay needs error_feedback"),
]


def test_bad_values_are_a_422_naming_the_field_and_store_nothing(coordinator):
    with coordinator.admin() as admin:
        for fields, where in INVALID:
            r = create(admin, **fields)
            assert r.status_code == 422, (fields, r.text)
            assert r.json()["error"] == "validation_error", fields
            assert where in r.json()["detail"], (fields, r.json()["detail"])
        assert tasks(coordinator.settings) == 0
        task = create(admin, warmup_rounds=4).json()
        for fields, where in INVALID:
            r = admin.patch(f"{API}/tasks/{task['id']}", json={"compression": fields})
            assert r.status_code == 422, (fields, r.text)
            assert where in r.json()["detail"], (fields, r.json()["detail"])
        assert admin.get(f"{API}/tasks/{task['id']}").json() == task
