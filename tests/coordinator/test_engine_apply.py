"""The aggregation steps (plan -> compute -> commit) on real rows and blobs, both backends:
every planned update applied in one commit (also when the ids span several ``IN`` batches),
a commit discarded when an update moved meanwhile, too-stale updates rejected at planning, and
the new model bit-identical to a float64 reference of the FedAvg step."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import apply, rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.strategies import FedAdaptive, FedAvg, FedAvgM
from fedge.coordinator.models import ModelVersion, Round, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.shared.modelspec import Weights
from fedge.shared.wire import decode_model
from tests.support.engine import first_round_with_uploads

NUM_UPDATES = 5


def _round_with_uploads(
    runtime: Runtime, rng: np.random.Generator, *, max_staleness: int = 4
) -> tuple[int, list[Weights], list[int]]:
    """A running task whose first round holds NUM_UPDATES uploads and is ``aggregating``;
    the task id, the deltas and their num_examples, in upload order."""
    task_id, uploaded = first_round_with_uploads(
        runtime,
        rng,
        n=NUM_UPDATES,
        aggregation={"max_staleness": max_staleness},
        scale=0.1,
        num_examples=lambda i: 3 + 7 * i,
    )
    return task_id, [u.delta for u in uploaded], [u.num_examples for u in uploaded]


def _plan(runtime: Runtime, task_id: int) -> apply.Plan | None:
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        return apply.plan_aggregation(
            session, task, rnd, AggregationConfig.from_dict(task.aggregation)
        )


def _commit(runtime: Runtime, plan: apply.Plan, result: apply.Result) -> list[str] | None:
    with session_scope(runtime.sessions) as session:
        return apply.commit_aggregation(
            session, plan, result, now=utcnow(), liveness=Liveness(default_poll_s=20.0)
        )


@pytest.mark.parametrize("batch", [apply.IN_BATCH, 2])
def test_one_aggregation_applies_every_update(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(apply, "IN_BATCH", batch)
    task_id, deltas, examples = _round_with_uploads(runtime, np.random.default_rng(7))
    plan = _plan(runtime, task_id)
    assert plan is not None and len(plan.items) == NUM_UPDATES
    result = apply.compute(plan, runtime.blobs, hook=None)
    assert set(result.timings) == {"aggregate", "step", "store", "eval"}
    assert _commit(runtime, plan, result) is not None

    # Bit-identical to the float64 reference: sum w_i * d_i in upload order, / sum w_i,
    # added to the float64 base weights, rounded to float32.
    base = decode_model(runtime.blobs.get(plan.base_digest))
    acc = {n: np.zeros(w.shape, np.float64) for n, w in base.items()}
    for delta, n in zip(deltas, examples, strict=True):
        for name, d in delta.items():
            acc[name] += np.multiply(d, float(n), dtype=np.float64)
    new = decode_model(runtime.blobs.get(result.model_digest))
    for name, w in base.items():
        expected = (np.asarray(w, np.float64) + acc[name] / sum(examples)).astype(np.float32)
        np.testing.assert_array_equal(new[name], expected)

    with session_scope(runtime.sessions) as session:
        updates = session.scalars(select(Update).where(Update.task_id == task_id)).all()
        assert [u.status for u in updates] == ["applied"] * NUM_UPDATES
        assert {u.applied_version for u in updates} == {1}
        assert sorted(u.weight for u in updates) == sorted(float(n) for n in examples)
        version = session.scalar(
            select(ModelVersion).where(ModelVersion.task_id == task_id, ModelVersion.version == 1)
        )
        assert version is not None and version.num_updates == NUM_UPDATES
        assert version.blob_digest == result.model_digest
        rnd = session.scalar(select(Round).where(Round.task_id == task_id))
        assert rnd is not None and rnd.status == "closed" and rnd.num_received == NUM_UPDATES
        task = session.get(Task, task_id)
        assert task is not None and task.current_version == 1


def test_commit_is_discarded_when_an_update_moved(runtime: Runtime) -> None:
    task_id, _, _ = _round_with_uploads(runtime, np.random.default_rng(8))
    plan = _plan(runtime, task_id)
    assert plan is not None
    result = apply.compute(plan, runtime.blobs, hook=None)
    with session_scope(runtime.sessions) as session:
        u = session.get(Update, plan.items[-1].update_id)
        assert u is not None
        u.status = "rejected"
    assert _commit(runtime, plan, result) is None
    with session_scope(runtime.sessions) as session:
        statuses = session.scalars(select(Update.status).where(Update.task_id == task_id)).all()
        assert sorted(statuses) == ["accepted"] * (NUM_UPDATES - 1) + ["rejected"]
        task = session.get(Task, task_id)
        assert task is not None and task.current_version == 0


def test_plan_rejects_updates_beyond_max_staleness(runtime: Runtime) -> None:
    task_id, _, _ = _round_with_uploads(runtime, np.random.default_rng(9), max_staleness=2)
    with session_scope(runtime.sessions) as session:
        # Pretend three versions were built meanwhile (same weights): tau = 3 > 2.
        v0 = session.scalar(
            select(ModelVersion).where(ModelVersion.task_id == task_id, ModelVersion.version == 0)
        )
        task = session.get(Task, task_id)
        assert v0 is not None and task is not None
        session.add(
            ModelVersion(
                task_id=task_id, version=3, blob_digest=v0.blob_digest, size_bytes=v0.size_bytes
            )
        )
        task.current_version = 3
    assert _plan(runtime, task_id) is None
    with session_scope(runtime.sessions) as session:
        updates = session.scalars(select(Update).where(Update.task_id == task_id)).all()
        assert [u.status for u in updates] == ["rejected"] * NUM_UPDATES
        assert all(
            u.reason == "staleness 3 at aggregation of version 4 exceeds max_staleness 2"
            for u in updates
        )
        rnd = rounds.active_round(session, task_id)
        assert rnd is not None and rnd.num_rejected == NUM_UPDATES


@pytest.mark.parametrize(
    "strategy",
    [
        FedAvg(lr=1.0),
        FedAvg(lr=0.3),
        FedAvgM(lr=0.5, momentum=0.9),
        FedAdaptive(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3, yogi=False),
        FedAdaptive(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3, yogi=True),
    ],
)
def test_new_weights_equal_float64_sum_rounded(strategy: object) -> None:
    """Adding the step into its own float64 buffer gives the same bits as
    ``float32(float64(w) + step)`` with fresh buffers."""
    rng = np.random.default_rng(3)
    weights = {"a": rng.standard_normal((30, 7)).astype(np.float32), "b": np.ones(7, np.float32)}
    delta = {n: 1e-3 * rng.standard_normal(w.shape) for n, w in weights.items()}
    assert isinstance(strategy, FedAvg | FedAvgM | FedAdaptive)
    expected_step = _reference_steps(strategy, {n: d.copy() for n, d in delta.items()})
    new, _ = strategy.step(weights, {n: d.copy() for n, d in delta.items()}, {})
    for name, w in weights.items():
        expected = (np.asarray(w, np.float64) + expected_step[name]).astype(np.float32)
        np.testing.assert_array_equal(new[name], expected)


def _reference_steps(
    strategy: FedAvg | FedAvgM | FedAdaptive, delta: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The float64 step each strategy takes from an empty state (the formulas, by hand)."""
    if isinstance(strategy, FedAvg):
        return {n: d * strategy.lr for n, d in delta.items()}
    if isinstance(strategy, FedAvgM):
        return {n: strategy.lr * d.copy() for n, d in delta.items()}
    out = {}
    for n, d in delta.items():
        m = strategy.beta1 * np.zeros_like(d) + (1.0 - strategy.beta1) * d
        v0 = np.full_like(d, strategy.eps**2)
        d2 = d * d
        if strategy.yogi:
            v = v0 - (1.0 - strategy.beta2) * d2 * np.sign(v0 - d2)
        else:
            v = strategy.beta2 * v0 + (1.0 - strategy.beta2) * d2
        out[n] = strategy.lr * m / (np.sqrt(v) + strategy.eps)
    return out
