"""Multi-Krum on a live coordinator: in a sync round and an async buffer, a device that sends
a boosted sign flip of an honest-looking update is rejected, the model moves along the honest
updates' direction by exactly their weighted mean, and the model version's metrics (and the
round's) count the rejection; inconsistent settings are refused with 422 at task creation.

The scheduler is disabled: the tests step the engine with a ``TaskStepper``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.shared.modelspec import Weights
from tests.coordinator.conftest import Coordinator
from tests.coordinator.test_norm_bound import flat, round_view, works_of
from tests.support.rounds import Db, create_task, decoded_delta, fleet_of, make_update, spec_of

API = "/api/v1"
KRUM = {"robust": "multi_krum", "krum_byzantine": 1, "krum_select": 4}
SYNC = {"clients_per_round": 5, "over_selection": 0.0, "min_updates": 5, "num_rounds": 3}
ASYNC = {"mode": "async", "buffer_size": 5, "max_concurrency": 5, "num_rounds": 3}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


@pytest.fixture
def stepper(coordinator: Coordinator) -> TaskStepper:
    runtime: Runtime = coordinator.app.state.runtime
    return TaskStepper(runtime)


@pytest.mark.parametrize("aggregation", [SYNC, ASYNC], ids=["sync", "async"])
def test_a_sign_flipped_update_is_rejected_and_the_model_moves_the_honest_way(
    coordinator: Coordinator, db: Db, stepper: TaskStepper, aggregation: dict[str, Any]
) -> None:
    with fleet_of(coordinator, 5) as fleet:
        task_id = create_task(coordinator, aggregation={**aggregation, **KRUM})
        stepper.step(task_id)
        works = works_of(stepper, task_id, list(fleet))
        spec = spec_of(works[0])
        rng = np.random.default_rng(31)
        direction = {t.name: rng.standard_normal(t.shape) for t in spec.tensors}

        def honest_like() -> Weights:
            return {
                k: (0.1 * (d + 0.3 * rng.standard_normal(d.shape))).astype(np.float32)
                for k, d in direction.items()
            }

        deltas, examples = [], []
        for i, (device, work) in enumerate(zip(fleet, works, strict=True)):
            delta = honest_like()
            if i == 2:  # the attacker: -4 x an honest-looking update, the largest claim
                delta = {k: (-4.0 * v).astype(np.float32) for k, v in delta.items()}
            examples.append(1000 if i == 2 else 10 * (i + 1))
            body = make_update(work, delta=delta, num_examples=examples[-1])
            r = device.upload(work, body)
            assert r.status_code == 201, r.text
            deltas.append(flat(decoded_delta(body, spec)))
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        moved = flat(db.weights(task_id, 1)) - flat(db.weights(task_id, 0))
        honest = [0, 1, 3, 4]
        w = np.asarray(examples, dtype=np.float64)[honest]
        want = w @ np.stack(deltas)[honest] / w.sum()
        np.testing.assert_allclose(moved, want, rtol=1e-5, atol=1e-6)
        assert float(moved @ flat(direction)) > 0
        # The plain weighted mean would have moved it backwards.
        mean = np.asarray(examples, dtype=np.float64) @ np.stack(deltas) / sum(examples)
        assert float(mean @ flat(direction)) < 0

        row = db.version(task_id, 1)
        assert row is not None and row.metrics["num_rejected"] == 1.0
        assert round_view(coordinator, task_id, 1)["metrics"]["num_rejected"] == 1.0


BAD = [
    (
        {**SYNC, "min_updates": 4, "robust": "multi_krum", "krum_byzantine": 1},
        "needs at least 5 updates per aggregation (2f + 3); min_updates is 4",
    ),
    (
        {**ASYNC, "robust": "multi_krum", "krum_byzantine": 2},
        "needs at least 7 updates per aggregation (2f + 3); buffer_size is 5",
    ),
    (
        {**SYNC, "robust": "multi_krum", "krum_byzantine": 1, "krum_select": 5},
        "krum_select (5) must not exceed min_updates - krum_byzantine (4)",
    ),
    ({**SYNC, "robust": "multi_krum", "krum_byzantine": 1.5}, "krum_byzantine"),
]


def test_inconsistent_krum_settings_are_refused_at_task_creation(
    coordinator: Coordinator,
) -> None:
    with coordinator.admin() as admin:
        for aggregation, detail in BAD:
            r = admin.post(
                f"{API}/tasks",
                json={
                    "name": "bad-krum",
                    "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
                    "aggregation": aggregation,
                    "training": {"epochs": 1, "batch_size": 8, "lr": 0.1},
                },
            )
            assert r.status_code == 422, r.text
            assert r.json()["error"] == "validation_error"
            assert detail in r.json()["detail"], (detail, r.json())
        listed = admin.get(f"{API}/tasks")
        assert listed.status_code == 200, listed.text
        assert listed.json()["items"] == []
