"""Each guard of an aggregation (fedge.coordinator.engine.apply), on real rows and blobs, both
backends: a commit is discarded when the task's version moved, the round left its active
states or the task ended; a paused task still commits but opens no new round; a plan takes
only its own task's updates and model, also with two tasks holding pending updates at once;
an async plan waits for a full buffer and takes the oldest ``buffer_size`` updates."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import apply, rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.models import ModelVersion, Round, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.tasks import transition
from fedge.shared.wire import decode_model
from tests.support.engine import first_round_with_uploads
from tests.support.rounds import SMALL_MODEL

N = 3


def _task_with_uploads(
    runtime: Runtime, rng: np.random.Generator, *, seed: int, num_rounds: int = 5
) -> tuple[int, dict[int, dict[str, np.ndarray]]]:
    """A running task (model seed ``seed``) whose first round holds N uploads and is
    ``aggregating``: the task id and each update's delta by update id."""
    task_id, uploaded = first_round_with_uploads(
        runtime,
        rng,
        n=N,
        model={**SMALL_MODEL, "seed": seed},
        aggregation={"num_rounds": num_rounds},
        prefix=f"d{seed}-",
    )
    return task_id, {u.update_id: u.delta for u in uploaded}


def _plan(runtime: Runtime, task_id: int, **overrides: object) -> apply.Plan | None:
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        cfg = AggregationConfig.from_dict({**task.aggregation, **overrides})
        return apply.plan_aggregation(session, task, rnd, cfg)


def _computed(
    runtime: Runtime, rng_seed: int, *, seed: int, num_rounds: int = 5
) -> tuple[int, apply.Plan, apply.Result]:
    """:func:`_task_with_uploads`, then its aggregation planned and computed (not committed)."""
    task_id, _ = _task_with_uploads(
        runtime, np.random.default_rng(rng_seed), seed=seed, num_rounds=num_rounds
    )
    plan = _plan(runtime, task_id)
    assert plan is not None
    return task_id, plan, apply.compute(plan, runtime.blobs, hook=None)


def _commit(runtime: Runtime, plan: apply.Plan, result: apply.Result) -> list[str] | None:
    with session_scope(runtime.sessions) as session:
        return apply.commit_aggregation(
            session, plan, result, now=utcnow(), liveness=Liveness(default_poll_s=20.0)
        )


def _state(runtime: Runtime, task_id: int) -> tuple[int, list[str], list[str]]:
    """(current version, update statuses, round statuses) of a task."""
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        updates = session.scalars(
            select(Update.status).where(Update.task_id == task_id).order_by(Update.id)
        ).all()
        statuses = session.scalars(
            select(Round.status).where(Round.task_id == task_id).order_by(Round.number)
        ).all()
        return task.current_version, list(map(str, updates)), list(map(str, statuses))


def _expected_model(
    runtime: Runtime, plan: apply.Plan, deltas: dict[int, dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The FedAvg step (lr 1, equal example counts) from the plan's base, in float64."""
    base = decode_model(runtime.blobs.get(plan.base_digest))
    ids = [i.update_id for i in plan.items]
    return {
        name: (
            np.asarray(w, np.float64)
            + sum(np.asarray(deltas[u][name], np.float64) for u in ids) / len(ids)
        ).astype(np.float32)
        for name, w in base.items()
    }


def test_two_tasks_with_pending_updates_at_once(runtime: Runtime) -> None:
    rng = np.random.default_rng(21)
    a, deltas_a = _task_with_uploads(runtime, rng, seed=1)
    b, deltas_b = _task_with_uploads(runtime, rng, seed=2)
    plan_a = _plan(runtime, a)
    plan_b = _plan(runtime, b)
    assert plan_a is not None and plan_b is not None
    # Each plan holds its own task's updates and builds on its own task's model.
    assert {i.update_id for i in plan_a.items} == set(deltas_a)
    assert {i.update_id for i in plan_b.items} == set(deltas_b)
    with session_scope(runtime.sessions) as session:
        digests = {
            t: session.scalar(
                select(ModelVersion.blob_digest).where(
                    ModelVersion.task_id == t, ModelVersion.version == 0
                )
            )
            for t in (a, b)
        }
    assert digests[a] != digests[b]  # different seeds, different initial weights
    assert (plan_a.base_digest, plan_b.base_digest) == (digests[a], digests[b])
    assert (plan_a.task_id, plan_b.task_id) == (a, b)
    result_a = apply.compute(plan_a, runtime.blobs, hook=None)
    assert _commit(runtime, plan_a, result_a) is not None
    assert _state(runtime, a)[:2] == (1, ["applied"] * N)
    assert _state(runtime, b)[:2] == (0, ["accepted"] * N)  # untouched by a's commit
    result_b = apply.compute(plan_b, runtime.blobs, hook=None)
    assert _commit(runtime, plan_b, result_b) is not None
    for plan, result, deltas in ((plan_a, result_a, deltas_a), (plan_b, result_b, deltas_b)):
        new = decode_model(runtime.blobs.get(result.model_digest))
        for name, expected in _expected_model(runtime, plan, deltas).items():
            np.testing.assert_allclose(new[name], expected, rtol=1e-6, atol=1e-6)
    with session_scope(runtime.sessions) as session:
        versions = session.execute(
            select(ModelVersion.task_id, ModelVersion.round_id).where(ModelVersion.version == 1)
        ).all()
        assert sorted(versions) == sorted([(a, plan_a.round_id), (b, plan_b.round_id)])


def test_commit_is_discarded_when_the_task_version_moved(runtime: Runtime) -> None:
    task_id, plan, result = _computed(runtime, 22, seed=3)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        task.current_version = 1  # another aggregation committed meanwhile
    assert _commit(runtime, plan, result) is None
    version, updates, round_statuses = _state(runtime, task_id)
    assert (version, updates, round_statuses) == (1, ["accepted"] * N, ["aggregating"])


def test_commit_is_discarded_when_the_round_is_no_longer_active(runtime: Runtime) -> None:
    task_id, plan, result = _computed(runtime, 23, seed=4)
    with session_scope(runtime.sessions) as session:
        rnd = session.get(Round, plan.round_id)
        assert rnd is not None
        rnd.status = "failed"
    assert _commit(runtime, plan, result) is None
    assert _state(runtime, task_id) == (0, ["accepted"] * N, ["failed"])


def test_commit_is_discarded_for_a_cancelled_task(runtime: Runtime) -> None:
    task_id, plan, result = _computed(runtime, 24, seed=5)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        task.status = "cancelled"
    assert _commit(runtime, plan, result) is None
    assert _state(runtime, task_id)[:2] == (0, ["accepted"] * N)


def test_a_paused_task_commits_but_opens_no_round(runtime: Runtime) -> None:
    task_id, plan, result = _computed(runtime, 25, seed=6)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        transition(session, task, "pause")
    assert _commit(runtime, plan, result) == []
    assert _state(runtime, task_id) == (1, ["applied"] * N, ["closed"])
    # Running, the same commit opens the next round (and wakes its devices).
    task_id, plan, result = _computed(runtime, 26, seed=7)
    woken = _commit(runtime, plan, result)
    assert woken is not None and len(woken) == N
    assert _state(runtime, task_id) == (1, ["applied"] * N, ["closed", "open"])


def test_the_last_round_finishes_the_task(runtime: Runtime) -> None:
    task_id, plan, result = _computed(runtime, 27, seed=8, num_rounds=1)
    assert _commit(runtime, plan, result) is not None
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None and task.status == "completed"
        assert task.current_version == 1


def test_async_plan_waits_for_a_full_buffer_and_takes_the_oldest(runtime: Runtime) -> None:
    task_id, deltas = _task_with_uploads(runtime, np.random.default_rng(28), seed=9)
    oldest_first = sorted(deltas)  # uploaded one after the other
    assert _plan(runtime, task_id, mode="async", buffer_size=N + 1) is None
    exact = _plan(runtime, task_id, mode="async", buffer_size=N)
    assert exact is not None and [i.update_id for i in exact.items] == oldest_first
    two = _plan(runtime, task_id, mode="async", buffer_size=N - 1)
    assert two is not None and [i.update_id for i in two.items] == oldest_first[: N - 1]
    assert _state(runtime, task_id)[1] == ["accepted"] * N  # planning changed nothing


def _target(name: str | None, value: float | None = None) -> AggregationConfig:
    if name is None:
        return AggregationConfig.from_dict({})
    return AggregationConfig.from_dict({"target_metric": {"name": name, "value": value}})


def test_target_reached() -> None:
    """Losses stop at or below the target, other metrics at or above; a missing metric or no
    target never stops a task."""
    assert not apply.target_reached(_target(None), {"accuracy": 1.0})
    accuracy = _target("server_accuracy", 0.9)
    assert apply.target_reached(accuracy, {"accuracy": 0.9})
    assert apply.target_reached(accuracy, {"accuracy": 0.95})
    assert not apply.target_reached(accuracy, {"accuracy": 0.89})
    assert not apply.target_reached(accuracy, {"loss": 0.0})
    assert not apply.target_reached(accuracy, {})
    loss = _target("server_loss", 0.5)
    assert apply.target_reached(loss, {"loss": 0.5})
    assert apply.target_reached(loss, {"loss": 0.4})
    assert not apply.target_reached(loss, {"loss": 0.51})
    plain = _target("accuracy", 0.5)  # the server_ prefix is optional
    assert apply.target_reached(plain, {"accuracy": 0.5})
    assert not apply.target_reached(plain, {"server_accuracy": 0.9})


def test_aggregation_failed_carries_its_reason() -> None:
    err = apply.AggregationFailed("the new model overflows")
    assert err.reason == "the new model overflows" == str(err)
