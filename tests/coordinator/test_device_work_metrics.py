"""Round metrics: device-reported training and evaluation metrics (reported before or after
the upload) and the server-side evaluation hook, which can also end a task early."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.settings import Settings
from fedge.shared import architectures
from fedge.shared.modelspec import Weights
from fedge.shared.wire import decode_model
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    SMALL_MODEL,
    Db,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    return rng.standard_normal((64, 4)).astype(np.float32), rng.integers(0, 3, 64)


def server_eval(model_config: dict, weights: Weights) -> dict[str, float]:
    """The evaluation hook under test (``settings.eval_hook`` points here)."""
    X, y = _held_out()
    return architectures.evaluate(model_config, weights, X, y)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"eval_hook": f"{__name__}:server_eval"})


def test_round_metrics_combine_device_reports_and_server_evaluation(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 2,
                "over_selection": 0.5,
                "min_updates": 2,
                "round_deadline_s": 600,
                "num_rounds": 3,
            },
        )
        works = [d.work(wait=10) for d in fleet]
        assert all(w is not None for w in works)
        spec = spec_of(works[0])  # type: ignore[arg-type]
        rng = np.random.default_rng(8)
        a, b = works[0], works[1]
        assert a is not None and b is not None
        # Device A reports before uploading, device B after.
        r = fleet[0].metrics(
            a["assignment_id"],
            train_loss=1.0,
            eval_loss=0.9,
            eval_accuracy=0.5,
            num_eval_examples=10,
            train_time_s=2.0,
        )
        assert r.status_code == 204
        for device, work, n in ((fleet[0], a, 10), (fleet[1], b, 30)):
            body = make_update(work, delta=random_delta(spec, rng), num_examples=n)
            assert device.upload(work, body).status_code == 201
        wait_until(lambda: db.task(task_id).current_version == 1)
        assert (
            fleet[1]
            .metrics(
                b["assignment_id"],
                train_loss=2.0,
                eval_loss=0.5,
                eval_accuracy=0.75,
                num_eval_examples=30,
                train_time_s=4.0,
            )
            .status_code
            == 204
        )

        with coordinator.admin() as admin:
            rnd = admin.get(f"{API}/tasks/{task_id}/rounds/1").json()
            versions = admin.get(f"{API}/tasks/{task_id}/models").json()["items"]
            latest = admin.get(f"{API}/tasks/{task_id}/models/1").content
        m = rnd["metrics"]
        assert m["train_loss"] == pytest.approx((1.0 * 10 + 2.0 * 30) / 40)  # by num_examples
        assert m["eval_loss"] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40)  # by eval examples
        assert m["eval_accuracy"] == pytest.approx((0.5 * 10 + 0.75 * 30) / 40)
        assert m["train_time_s"] == pytest.approx(3.0)
        # The server-side hook evaluated the committed model.
        X, y = _held_out()
        want = architectures.evaluate(SMALL_MODEL, decode_model(latest), X, y)
        assert m["server_loss"] == pytest.approx(want["loss"])
        assert m["server_accuracy"] == pytest.approx(want["accuracy"])
        v1 = next(v for v in versions if v["version"] == 1)
        assert v1["metrics"]["server_loss"] == pytest.approx(want["loss"])
        assert v1["metrics"]["train_loss"] == pytest.approx(m["train_loss"])


def test_metrics_carried_in_the_update_count_like_a_report(
    coordinator: Coordinator, db: Db
) -> None:
    """No separate report: the update's metrics block reaches the round, and a report sent
    afterwards still joins in."""
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation=every_device(2, rounds=2),
        )
        works = [d.work(wait=10) for d in fleet]
        assert all(w is not None for w in works)
        a, b = works[0], works[1]
        assert a is not None and b is not None
        spec = spec_of(a)
        rng = np.random.default_rng(3)
        inline = {"train_loss": 1.5, "eval_accuracy": 0.25, "num_eval_examples": 8}
        body = make_update(a, delta=random_delta(spec, rng), num_examples=10, metrics=inline)
        assert fleet[0].upload(a, body).status_code == 201
        body = make_update(b, delta=random_delta(spec, rng), num_examples=30)
        assert fleet[1].upload(b, body).status_code == 201
        wait_until(lambda: db.task(task_id).current_version == 1)
        with coordinator.admin() as admin:
            m = admin.get(f"{API}/tasks/{task_id}/rounds/1").json()["metrics"]
        assert m["train_loss"] == pytest.approx(1.5)  # only A sent one
        assert m["eval_accuracy"] == pytest.approx(0.25)
        assert m["eval_examples"] == 8
        r = fleet[1].metrics(b["assignment_id"], train_loss=0.5)
        assert r.status_code == 204
        with coordinator.admin() as admin:
            m = admin.get(f"{API}/tasks/{task_id}/rounds/1").json()["metrics"]
        assert m["train_loss"] == pytest.approx((1.5 * 10 + 0.5 * 30) / 40)


def test_a_trainers_own_metrics_are_kept_and_averaged_by_examples(
    coordinator: Coordinator, db: Db
) -> None:
    """Names beyond the five known ones travel in the update and are averaged over the
    updates that report them, weighted by their examples."""
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(coordinator, aggregation=every_device(2, rounds=2))
        works = [d.work(wait=10) for d in fleet]
        a, b = works[0], works[1]
        assert a is not None and b is not None
        spec = spec_of(a)
        rng = np.random.default_rng(4)
        sent = (
            (fleet[0], a, 10, {"train_loss": 1.0, "macro_f1": 0.5}),
            (fleet[1], b, 30, {"macro_f1": 0.875, "mae": 2.5}),
        )
        for device, work, n, metrics in sent:
            body = make_update(work, delta=random_delta(spec, rng), num_examples=n, metrics=metrics)
            assert device.upload(work, body).status_code == 201
        wait_until(lambda: db.task(task_id).current_version == 1)
        with coordinator.admin() as admin:
            m = admin.get(f"{API}/tasks/{task_id}/rounds/1").json()["metrics"]
            v1 = admin.get(f"{API}/tasks/{task_id}/models").json()["items"][1]
        assert m["macro_f1"] == pytest.approx((0.5 * 10 + 0.875 * 30) / 40)
        assert m["mae"] == pytest.approx(2.5)  # only B reported it
        assert m["train_loss"] == pytest.approx(1.0)
        assert v1["metrics"]["macro_f1"] == pytest.approx(m["macro_f1"])
        # a JSON report keeps to the five known names: a custom one is refused, not dropped
        r = fleet[1].metrics(b["assignment_id"], macro_f1=0.1)
        assert r.status_code == 422
        assert r.json()["error"] == "validation_error"


def test_reaching_the_target_metric_completes_the_task(coordinator: Coordinator, db: Db) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 1,
                "over_selection": 1.0,
                "min_updates": 1,
                "num_rounds": 50,
                # Any finite loss is below this: the first version reaches the target.
                "target_metric": {"name": "loss", "value": 1e6},
            },
        )
        works = [d.work(wait=10) for d in fleet]
        first = works[0]
        assert first is not None and works[1] is not None
        body = make_update(
            first, delta=random_delta(spec_of(first), np.random.default_rng(0)), num_examples=4
        )
        assert fleet[0].upload(first, body).status_code == 201
        task = db.wait_task(task_id, lambda t: t.status == "completed")
        assert task.current_version == 1
        assert task.finished_at is not None
        assert "loss reached" in (task.status_reason or "")
        assert db.round(task_id, 2) is None
        stopped = fleet[1].work(current=works[1]["assignment_id"])
        assert stopped is not None and stopped["status"] == "cancelled"
