"""Central differential privacy (DP-FedAvg) on the round engine, stepped directly on real rows
and blobs, both backends: the noise added to the mean has the configured std, every update's
contribution is clipped, the ledger's epsilon is what dp-accounting computes for the round's
parameters, configs that cannot be accounted are refused, and a task stops before the round
that would exceed its epsilon budget."""

from __future__ import annotations

import math
import secrets
from datetime import timedelta
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from sqlalchemy import select

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import apply, privacy, rounds
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.updates import accept_upload
from fedge.coordinator.models import Assignment, ModelVersion, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.tasks import TaskCreate
from fedge.coordinator.tasks import create_task, transition
from fedge.shared.compression import compress
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_model, decode_update, encode_update
from tests.support.engine import enroll_seen
from tests.support.rounds import EXACT

#: Devices that polled within the test count as reachable.
LIVENESS = Liveness(polls=3, default_poll_s=60, max_window_s=600)


#: The Renyi orders the coordinator documents (docs/privacy.md), written out independently.
DOC_ORDERS = [*range(2, 65), 80, 96, 128, 192, 256, 512, 1024]
#: 50,100 parameters: enough coordinates to estimate the noise's std to about 0.3%.
WIDE_MODEL = {"architecture": "softmax", "input_dim": 500, "num_classes": 100}


def _dp_aggregation(cohort: int, **privacy_fields: Any) -> dict[str, Any]:
    return {
        "clients_per_round": cohort,
        "over_selection": 0.0,
        "min_updates": 1,
        "num_rounds": 50,
        "weighting": "equal",
        "max_staleness": 0,
        "privacy": {"mode": "central", **privacy_fields},
    }


def _task(runtime: Runtime, aggregation: dict[str, Any], model: dict[str, Any]) -> int:
    body = TaskCreate.model_validate(
        {
            "name": f"t-{secrets.token_hex(3)}",
            "model": model,
            "aggregation": aggregation,
            "compression": EXACT,
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.1},
        }
    )
    with session_scope(runtime.sessions) as session:
        task = create_task(session, runtime.blobs, runtime.settings, body)
        transition(session, task, "start")
        return task.id


def _open(runtime: Runtime, task_id: int) -> list[tuple[int, str]] | None:
    """The assignments of the task's open round, opening one when there is none (the engine
    opens the next round itself when it commits an aggregation); None once the task stopped."""
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        if task.status != "running":
            return None
        rnd = rounds.active_round(session, task_id)
        if rnd is None:
            cfg = AggregationConfig.from_dict(task.aggregation)
            rnd, _ = rounds.open_sync_round(session, task, cfg, now=utcnow(), liveness=LIVENESS)
            if rnd is None:
                return None
        return [
            (a.id, a.device_id)
            for a in session.scalars(select(Assignment).where(Assignment.round_id == rnd.id))
        ]


def _upload_all(
    runtime: Runtime, task_id: int, work: list[tuple[int, str]], deltas: list[Weights]
) -> None:
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        version = task.current_version
    policy = CompressionPolicy.from_dict(EXACT)
    for (assignment_id, device_id), delta in zip(work, deltas, strict=True):
        data = encode_update(
            compress(delta, policy, np.random.default_rng(0)),
            task_id=task_id,
            base_version=version,
            num_examples=10,
        )
        accept_upload(
            runtime,
            device_id=device_id,
            assignment_id=assignment_id,
            key=secrets.token_hex(8),
            body=data,
        )


def _close_and_plan(runtime: Runtime, task_id: int) -> apply.Plan:
    """The open round closed and its aggregation planned."""
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        cfg = AggregationConfig.from_dict(task.aggregation)
        rounds.close_sync_round_if_due(session, task, rnd, cfg, now=utcnow())
        assert rnd.status == "aggregating"
        plan = apply.plan_aggregation(session, task, rnd, cfg)
    assert plan is not None
    return plan


def _aggregate(runtime: Runtime, task_id: int, rng: np.random.Generator) -> apply.Plan:
    plan = _close_and_plan(runtime, task_id)
    result = apply.compute(plan, runtime.blobs, hook=None, noise_rng=rng)
    with session_scope(runtime.sessions) as session:
        assert (
            apply.commit_aggregation(session, plan, result, now=utcnow(), liveness=LIVENESS)
            is not None
        )
    return plan


def _scaled(delta: Weights, norm: float) -> Weights:
    """``delta`` rescaled to L2 norm ``norm``."""
    current = math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.values()))
    return {k: (v * (norm / current)).astype(np.float32) for k, v in delta.items()}


def _independent_epsilon(q: float, z: float, rounds_: int, delta: float, orders: Any) -> float:
    accountant = rdp.RdpAccountant(orders) if orders is not None else rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds_
    )
    return float(accountant.get_epsilon(delta))


def test_noise_std_matches_the_configuration_and_updates_are_clipped(runtime: Runtime) -> None:
    """Three updates, two far beyond clip_norm: the new model minus the base minus the mean of
    the *clipped* updates (fixed denominator) is the noise; its std over 50,100 coordinates is
    ``noise_multiplier * clip_norm / expected_cohort`` within 5 standard errors
    (``sigma / sqrt(2 n)`` for the sample std of n normals), its mean within 5 ``sigma/sqrt(n)``."""
    clip, z, cohort = 2.0, 1.3, 3
    enroll_seen(runtime, cohort)
    task_id = _task(
        runtime, _dp_aggregation(cohort, clip_norm=clip, noise_multiplier=z), WIDE_MODEL
    )
    work = _open(runtime, task_id)
    assert work is not None and len(work) == cohort
    rng = np.random.default_rng(11)
    spec = ModelSpec.from_dict([{"name": "W", "shape": [500, 100]}, {"name": "b", "shape": [100]}])
    raw = [
        {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
        for _ in range(3)
    ]
    deltas = [_scaled(raw[0], 0.5), _scaled(raw[1], 40.0), _scaled(raw[2], 900.0)]
    _upload_all(runtime, task_id, work, deltas)
    plan = _aggregate(runtime, task_id, np.random.default_rng(12))

    expected_mean = {t.name: np.zeros(t.shape, np.float64) for t in spec.tensors}
    for d in deltas:
        norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in d.values()))
        for name, v in d.items():
            expected_mean[name] += v.astype(np.float64) * min(1.0, clip / norm) / cohort
    base = decode_model(runtime.blobs.get(plan.base_digest))
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None and task.current_version == 1
        v1 = session.scalar(
            select(ModelVersion).where(ModelVersion.task_id == task_id, ModelVersion.version == 1)
        )
        assert v1 is not None
        new = decode_model(runtime.blobs.get(v1.blob_digest))
    noise = np.concatenate(
        [(new[n].astype(np.float64) - base[n] - expected_mean[n]).ravel() for n in ("W", "b")]
    )
    n = noise.size
    sigma = z * clip / cohort
    assert n == 50_100
    assert abs(noise.std() / sigma - 1.0) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    # Dense noise: every coordinate moved (docs/privacy.md, download compression).
    assert np.count_nonzero(noise) == n


def test_the_noise_comes_from_the_given_generator_or_from_the_systems(runtime: Runtime) -> None:
    """A private mean's noise is drawn from the generator the computation is given (the same
    seed gives the same model) and otherwise from a fresh CSPRNG-seeded one each time (two
    such computations differ from each other and from the seeded one); its total weight is
    the number of updates (the fixed denominator is the cohort)."""
    enroll_seen(runtime, 2)
    task_id = _task(
        runtime,
        _dp_aggregation(2, clip_norm=1.0, noise_multiplier=1.0),
        {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
    )
    work = _open(runtime, task_id)
    assert work is not None and len(work) == 2
    rng = np.random.default_rng(31)
    spec = ModelSpec.from_dict([{"name": "W", "shape": [4, 3]}, {"name": "b", "shape": [3]}])
    deltas = [
        {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
        for _ in work
    ]
    _upload_all(runtime, task_id, work, deltas)
    plan = _close_and_plan(runtime, task_id)
    seeded = [
        apply.compute(plan, runtime.blobs, hook=None, noise_rng=np.random.default_rng(5))
        for _ in range(2)
    ]
    assert seeded[0].model_digest == seeded[1].model_digest
    assert seeded[0].total_weight == 2.0
    fresh = [apply.compute(plan, runtime.blobs, hook=None) for _ in range(2)]
    assert len({seeded[0].model_digest, *(r.model_digest for r in fresh)}) == 3


def test_clipping_bounds_each_contribution_of_sparse_quantized_updates() -> None:
    """The coordinator clips the decoded (top-k, dequantized) update: each contribution has
    norm min(norm, clip_norm) and the update's direction; the sum is the sum of those."""
    spec = ModelSpec.from_dict([{"name": "w", "shape": [40, 25]}, {"name": "b", "shape": [25]}])
    policy = CompressionPolicy.from_dict({"topk_fraction": 0.1, "bits": 8, "error_feedback": False})
    rng = np.random.default_rng(3)
    clip = 1.5
    decoded = []
    for scale in (0.01, 1.0, 30.0, 5000.0):
        delta = {
            t.name: (scale * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.tensors
        }
        body = encode_update(
            compress(delta, policy, rng), task_id=1, base_version=0, num_examples=1
        )
        decoded.append(decode_update(body, spec=spec, policy=policy))
    total, count = privacy.private_sum(iter(decoded), spec, clip_norm=clip)
    assert count == 4
    expected = {t.name: np.zeros(t.shape, np.float64) for t in spec.tensors}
    norms = []
    for u in decoded:
        dense = u.to_dense()
        norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in dense.values()))
        norms.append(norm)
        contribution = {k: v.astype(np.float64) * min(1.0, clip / norm) for k, v in dense.items()}
        c_norm = math.sqrt(sum(float(np.sum(c * c)) for c in contribution.values()))
        assert c_norm <= clip * (1 + 1e-9)
        assert c_norm == pytest.approx(min(norm, clip), rel=1e-9)
        for k in expected:
            expected[k] += contribution[k]
    assert norms[0] < clip < norms[2]  # both sides of the bound are exercised
    for k in expected:
        np.testing.assert_allclose(total[k], expected[k], rtol=1e-6, atol=1e-9)


def test_epsilon_matches_dp_accounting_for_the_task_parameters(runtime: Runtime) -> None:
    """Five eligible devices, two picked per round (q = 0.4), three rounds: the ledger's
    epsilon equals an RDP accountant built here over the documented orders, and is within
    2% above dp-accounting's default orders (coarser orders can only overstate epsilon)."""
    z, delta = 0.9, 1e-3
    enroll_seen(runtime, 5)
    task_id = _task(
        runtime,
        _dp_aggregation(2, clip_norm=1.0, noise_multiplier=z, delta=delta),
        {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
    )
    rng = np.random.default_rng(5)
    spec = ModelSpec.from_dict([{"name": "W", "shape": [4, 3]}, {"name": "b", "shape": [3]}])
    for _ in range(3):
        work = _open(runtime, task_id)
        assert work is not None and len(work) == 2
        deltas = [
            {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
            for _ in work
        ]
        _upload_all(runtime, task_id, work, deltas)
        _aggregate(runtime, task_id, rng)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None and task.privacy is not None
        stored = dict(task.privacy)
        rnd = rounds.active_round(session, task_id)
        assert rnd is not None
        open_round = rnd.id
    # Three released rounds at q = 0.4; the fourth is open, noted, and not charged.
    assert stored["events"] == [[0.4, z, 3]]
    assert stored["open_round"] == {"round_id": open_round, "sampling_rate": 0.4}
    assert stored["rounds_accounted"] == 3
    exact = _independent_epsilon(0.4, z, 3, delta, DOC_ORDERS)
    assert stored["epsilon"] == pytest.approx(exact, rel=1e-9)
    default = _independent_epsilon(0.4, z, 3, delta, None)
    assert default <= stored["epsilon"] <= 1.02 * default


def test_task_stops_before_the_round_that_would_exceed_its_budget(runtime: Runtime) -> None:
    """target_epsilon between the epsilon of two and of three rounds: two rounds run, the
    third does not open, the task completes and says why."""
    z, delta, q = 1.1, 1e-4, 0.5
    after2 = _independent_epsilon(q, z, 2, delta, DOC_ORDERS)
    after3 = _independent_epsilon(q, z, 3, delta, DOC_ORDERS)
    target = (after2 + after3) / 2
    enroll_seen(runtime, 4)
    task_id = _task(
        runtime,
        _dp_aggregation(2, clip_norm=1.0, noise_multiplier=z, delta=delta, target_epsilon=target),
        {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
    )
    rng = np.random.default_rng(6)
    spec = ModelSpec.from_dict([{"name": "W", "shape": [4, 3]}, {"name": "b", "shape": [3]}])
    opened = 0
    while (work := _open(runtime, task_id)) is not None:
        opened += 1
        assert opened <= 2
        deltas = [
            {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
            for _ in work
        ]
        _upload_all(runtime, task_id, work, deltas)
        _aggregate(runtime, task_id, rng)
    assert opened == 2
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        assert task.status == "completed" and task.current_version == 2
        assert task.status_reason is not None and "privacy budget" in task.status_reason
        assert f"target_epsilon {target:g}" in task.status_reason
        assert task.privacy is not None
        assert task.privacy["epsilon"] == pytest.approx(after2, rel=1e-9)
        assert task.privacy["epsilon"] <= target


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"weighting": "num_examples"}, "weighting 'equal'"),
        ({"max_staleness": 2}, "max_staleness 0"),
        ({"mode": "async"}, "mode 'sync'"),
        ({"robust": "median"}, "cannot be combined with norm_bound or a robust"),
        ({"norm_bound": {"max_norm": 1.0}}, "cannot be combined with norm_bound or a robust"),
    ],
)
def test_configs_that_cannot_be_accounted_are_refused(changes: dict[str, Any], words: str) -> None:
    data = {**_dp_aggregation(5, clip_norm=1.0, noise_multiplier=1.0), **changes}
    with pytest.raises(ConfigError, match=words):
        AggregationConfig.from_dict(data)


def test_local_mode_takes_no_budget_and_any_weighting() -> None:
    ok = AggregationConfig.from_dict(
        {"privacy": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 2.0}}
    )
    assert ok.central_dp is None and ok.privacy is not None
    with pytest.raises(ConfigError, match="target_epsilon needs mode 'central'"):
        AggregationConfig.from_dict(
            {
                "privacy": {
                    "mode": "local",
                    "clip_norm": 1.0,
                    "noise_multiplier": 2.0,
                    "target_epsilon": 3.0,
                }
            }
        )


@pytest.mark.parametrize(
    ("picked", "eligible", "q"),
    [(10, 100, 0.1), (13, 100, 0.13), (10, 3, 1.0), (1, 3, 0.334), (7, 123_456, 5.68e-5)],
)
def test_sampling_rates_are_rounded_up(picked: int, eligible: int, q: float) -> None:
    rate = privacy.rounded_rate(picked, eligible)
    assert rate == pytest.approx(q, rel=1e-12)
    assert rate >= min(1.0, picked / eligible)


def test_uploads_of_a_failed_round_do_not_join_the_next_sample(runtime: Runtime) -> None:
    """A round below quorum at its deadline fails; its upload is not counted towards the next
    round's target and is rejected at the next aggregation, which holds that round's sample
    only (the accountant charged that sample)."""
    enroll_seen(runtime, 4)
    aggregation = {**_dp_aggregation(2, clip_norm=1.0, noise_multiplier=1.0), "min_updates": 2}
    task_id = _task(
        runtime, aggregation, {"architecture": "softmax", "input_dim": 4, "num_classes": 3}
    )
    spec = ModelSpec.from_dict([{"name": "W", "shape": [4, 3]}, {"name": "b", "shape": [3]}])
    rng = np.random.default_rng(8)

    def deltas(n: int) -> list[Weights]:
        return [
            {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
            for _ in range(n)
        ]

    first = _open(runtime, task_id)
    assert first is not None and len(first) == 2
    _upload_all(runtime, task_id, first[:1], deltas(1))
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None and rnd.deadline_at is not None
        cfg = AggregationConfig.from_dict(task.aggregation)
        rounds.close_sync_round_if_due(
            session, task, rnd, cfg, now=rnd.deadline_at + timedelta(seconds=1)
        )
        assert rnd.status == "failed"
    second = _open(runtime, task_id)
    assert second is not None and len(second) == 2
    _upload_all(runtime, task_id, second[:1], deltas(1))
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        # One upload of this round's sample: the earlier round's does not make a quorum.
        rounds.close_sync_round_if_due(session, task, rnd, cfg, now=utcnow())
        assert rnd.status == "open" and rnd.num_received == 1
    _upload_all(runtime, task_id, second[1:], deltas(1))
    _aggregate(runtime, task_id, rng)
    with session_scope(runtime.sessions) as session:
        rows = session.execute(
            select(Update.round_id, Update.status, Update.reason)
            .where(Update.task_id == task_id)
            .order_by(Update.id)
        ).all()
        v1 = session.scalar(
            select(ModelVersion).where(ModelVersion.task_id == task_id, ModelVersion.version == 1)
        )
    assert v1 is not None and v1.num_updates == 2
    (old_round, old_status, old_reason), *fresh = rows
    assert old_status == "rejected" and "not in the sample of round 2" in (old_reason or "")
    assert [status for _, status, _ in fresh] == ["applied", "applied"]
    assert {round_id for round_id, _, _ in fresh} == {v1.round_id} != {old_round}
