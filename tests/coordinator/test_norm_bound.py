"""The L2 norm bound and robust aggregation on a live coordinator (issue 15 part A).

- clip: an update scaled by 1e30 (and a large finite one within ``max_update_abs``) moves
  the model by at most the bound; the round, the device and the update row count it;
- refuse: such an update is refused at upload with 422 ``update_norm_exceeded`` and changes
  nothing but the device's ``num_norm_refused``;
- sync rounds and async buffers both combine with the task's ``robust`` setting;
- the adaptive bound is stored on the task at each aggregation and used by the next.

The scheduler is disabled: the tests step the engine with a ``TaskStepper``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedge.coordinator.engine import bounds
from fedge.coordinator.engine.bounds import NormBoundConfig
from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.shared.modelspec import ModelSpec, Weights
from tests.coordinator.conftest import Coordinator
from tests.support.rounds import (
    Db,
    TestDevice,
    create_task,
    decoded_delta,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
)

F32_MAX = float(np.finfo(np.float32).max)
SYNC = {"clients_per_round": 3, "over_selection": 0.0, "min_updates": 1, "num_rounds": 5}
ASYNC = {"mode": "async", "buffer_size": 3, "max_concurrency": 3, "num_rounds": 5}
API = "/api/v1"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


@pytest.fixture
def stepper(coordinator: Coordinator) -> TaskStepper:
    runtime: Runtime = coordinator.app.state.runtime
    return TaskStepper(runtime)


def works_of(stepper: TaskStepper, task_id: int, devices: list[TestDevice]) -> list[dict[str, Any]]:
    out = []
    for device in devices:
        work = device.work()
        if work is None:  # async: the round opens on the engine's step
            stepper.step(task_id)
            work = device.work()
        assert work is not None
        out.append(work)
    return out


def flat(weights: Weights) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in weights.values()])


def scaled(delta: Weights, factor: float) -> Weights:
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in delta.items()}


def device_view(coordinator: Coordinator, device_id: str) -> dict[str, Any]:
    with coordinator.admin() as admin:
        r = admin.get(f"{API}/devices/{device_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def round_view(coordinator: Coordinator, task_id: int, number: int) -> dict[str, Any]:
    with coordinator.admin() as admin:
        r = admin.get(f"{API}/tasks/{task_id}/rounds")
        assert r.status_code == 200, r.text
        (found,) = [x for x in r.json()["items"] if x["number"] == number]
        return dict(found)


# ------------------------------------------------------------------------ clip


@pytest.mark.parametrize("aggregation", [SYNC, ASYNC], ids=["sync", "async"])
@pytest.mark.parametrize("factor", [1e30, 1e4], ids=["1e30", "large-finite"])
def test_a_huge_update_moves_the_model_by_at_most_the_bound_when_clipped(
    coordinator: Coordinator,
    db: Db,
    stepper: TaskStepper,
    aggregation: dict[str, Any],
    factor: float,
) -> None:
    bound = 0.5
    # 1e30 needs the per-value bound off; 1e4 x 0.1-sized values stay within its default 1e6.
    per_value = {"max_update_abs": F32_MAX} if factor > 1e6 else {}
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={**aggregation, **per_value, "norm_bound": {"max_norm": bound}},
        )
        stepper.step(task_id)
        works = works_of(stepper, task_id, list(fleet))
        spec = spec_of(works[0])
        rng = np.random.default_rng(11)
        attacker = fleet[0]
        for i, (device, work) in enumerate(zip(fleet, works, strict=True)):
            delta = random_delta(spec, rng, scale=0.01)
            if i == 0:
                delta = scaled(random_delta(spec, rng), factor)
            r = device.upload(work, make_update(work, delta=delta, num_examples=10))
            assert r.status_code == 201, r.text
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        moved = flat(db.weights(task_id, 1)) - flat(db.weights(task_id, 0))
        assert np.all(np.isfinite(moved))
        assert np.linalg.norm(moved) <= bound * (1 + 1e-5)

        rnd = round_view(coordinator, task_id, 1)
        assert rnd["num_clipped"] == 1
        assert rnd["metrics"]["norm_bound"] == bound
        assert device_view(coordinator, attacker.device_id)["num_norm_clipped"] == 1
        for other in fleet[1:]:
            view = device_view(coordinator, other.device_id)
            assert (view["num_norm_clipped"], view["num_norm_refused"]) == (0, 0)
        rows = {u.device_id: u for u in db.updates(task_id)}
        big = rows[attacker.device_id]
        assert big.norm is not None and big.norm > 100 * bound
        assert big.clip_scale == pytest.approx(bound / big.norm)
        assert all(rows[d.device_id].clip_scale == 1.0 for d in fleet[1:])


# ------------------------------------------------------------------------ refuse


def test_refuse_mode_answers_422_and_changes_nothing_but_the_count(
    coordinator: Coordinator, db: Db, stepper: TaskStepper
) -> None:
    bound = 0.5
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                **SYNC,
                "max_update_abs": F32_MAX,
                "norm_bound": {"max_norm": bound, "action": "refuse"},
            },
        )
        stepper.step(task_id)
        works = works_of(stepper, task_id, list(fleet))
        spec = spec_of(works[0])
        rng = np.random.default_rng(12)
        attacker, work = fleet[0], works[0]
        before_assignments = [(a.id, a.status) for a in db.assignments(task_id)]
        for factor in (1e30, 10.0):
            body = make_update(work, delta=scaled(random_delta(spec, rng), factor), num_examples=5)
            r = attacker.upload(work, body)
            assert (r.status_code, r.json()["error"]) == (422, "update_norm_exceeded"), r.text
            assert "norm" in r.json()["detail"]
        assert db.updates(task_id) == []
        assert [(a.id, a.status) for a in db.assignments(task_id)] == before_assignments
        assert db.task(task_id).current_version == 0
        view = device_view(coordinator, attacker.device_id)
        assert (view["num_norm_refused"], view["num_norm_clipped"], view["num_completed"]) == (
            2,
            0,
            0,
        )

        # Within the bound the same assignment is accepted, and the round closes.
        for device, w in zip(fleet, works, strict=True):
            small = random_delta(spec, rng, scale=0.01)
            ok = device.upload(w, make_update(w, delta=small, num_examples=5))
            assert ok.status_code == 201, ok.text
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        assert round_view(coordinator, task_id, 1)["num_clipped"] == 0


# ------------------------------------------------------------------------ robust


@pytest.mark.parametrize("aggregation", [SYNC, ASYNC], ids=["sync", "async"])
@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_sync_and_async_use_the_robust_setting(
    coordinator: Coordinator,
    db: Db,
    stepper: TaskStepper,
    aggregation: dict[str, Any],
    method: str,
) -> None:
    """Three updates, one of them 1e6 times larger: the median (and the trimmed mean with one
    value dropped at each end, i.e. the median of three) is the middle value per coordinate."""
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                **aggregation,
                "max_update_abs": F32_MAX,
                "robust": method,
                "trim_fraction": 0.34,
            },
        )
        stepper.step(task_id)
        works = works_of(stepper, task_id, list(fleet))
        spec: ModelSpec = spec_of(works[0])
        rng = np.random.default_rng(13)
        deltas = []
        for i, (device, work) in enumerate(zip(fleet, works, strict=True)):
            delta = random_delta(spec, rng, scale=0.01)
            if i == 0:
                delta = scaled(delta, 1e6)
            body = make_update(work, delta=delta, num_examples=10 * (i + 1))
            assert device.upload(work, body).status_code == 201
            deltas.append(decoded_delta(body, spec))
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        w0, w1 = db.weights(task_id, 0), db.weights(task_id, 1)
        for name in w0:
            stack = np.stack([d[name].astype(np.float64) for d in deltas])
            want = (w0[name].astype(np.float64) + np.median(stack, axis=0)).astype(np.float32)
            np.testing.assert_allclose(w1[name], want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ adaptive


def test_the_adaptive_bound_is_stored_at_each_aggregation_and_used_by_the_next(
    coordinator: Coordinator, db: Db, stepper: TaskStepper
) -> None:
    config = {"max_norm": 100.0, "adaptive": {"quantile": 0.5, "lr": 0.5, "initial": 10.0}}
    parsed = NormBoundConfig.model_validate(config)
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(coordinator, aggregation={**SYNC, "norm_bound": config})
        stepper.step(task_id)
        rng = np.random.default_rng(14)
        expected = 10.0
        for version in (1, 2, 3):
            works = works_of(stepper, task_id, list(fleet))
            spec = spec_of(works[0])
            norms = []
            for device, work in zip(fleet, works, strict=True):
                body = make_update(work, delta=random_delta(spec, rng), num_examples=10)
                assert device.upload(work, body).status_code == 201
                norms.append(float(np.linalg.norm(flat(decoded_delta(body, spec)))))
            stepper.step(task_id)
            assert db.task(task_id).current_version == version
            row = db.version(task_id, version)
            assert row is not None and row.metrics["norm_bound"] == pytest.approx(expected)
            after = bounds.adapt(parsed, expected, norms)
            assert after is not None
            # All norms (about 0.1 x sqrt(size)) are far below 10: the bound shrinks.
            assert after < expected
            assert db.task(task_id).norm_bound == pytest.approx(after)
            expected = after


@pytest.mark.parametrize(
    ("aggregation", "field"),
    [
        ({"norm_bound": {"max_norm": 1.0, "action": "refuse", "adaptive": {}}}, "norm_bound"),
        ({"norm_bound": {"max_norm": -1.0}}, "max_norm"),
        ({"norm_bound": {"max_norm": 1.0, "action": "drop"}}, "action"),
        ({"robust": "krum"}, "robust"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
    ],
)
def test_bad_robustness_settings_are_refused_at_task_creation(
    coordinator: Coordinator, aggregation: dict[str, Any], field: str
) -> None:
    with coordinator.admin() as admin:
        r = admin.post(
            f"{API}/tasks",
            json={
                "name": "bad",
                "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
                "aggregation": aggregation,
                "training": {"epochs": 1, "batch_size": 8, "lr": 0.1},
            },
        )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "validation_error"
    assert field in r.json()["detail"]
