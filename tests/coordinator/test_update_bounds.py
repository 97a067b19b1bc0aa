"""Update bounds (issue 10, cases 5 and 6): no upload can make the aggregate overflow or take
over its weight, and an aggregation that fails anyway fails its round once instead of being
retried forever.

- values beyond the task's ``max_update_abs`` are refused at upload (422
  ``update_out_of_range``), and the task goes on;
- an aggregation whose result leaves float32's range fails its round with the reason and
  rejects its updates, once; the next round opens (sync and async);
- ``num_examples`` above the task's ``max_num_examples`` is refused (422
  ``num_examples_out_of_range``); a claim above the device's history counts at the bound
  (stored and in the answer's weight); a claim far above the cohort's is clipped at
  aggregation;
- unit tests of the counting rule and of ``compute``'s finite checks.

The scheduler is disabled: the tests step the engine with a ``TaskStepper`` so they control
exactly how often an aggregation is attempted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fedge.coordinator.blobstore import BlobStore, FileBlobStore
from fedge.coordinator.engine import apply, examples
from fedge.coordinator.engine.config import FLOAT32_MAX, AggregationConfig, ConfigError
from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.models import Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas import tasks as task_schemas
from fedge.coordinator.settings import Settings
from fedge.shared.compression import compress
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import encode_model, encode_update
from tests.coordinator.conftest import Coordinator
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support.rounds import (
    SMALL_MODEL,
    Db,
    Fleet,
    TestDevice,
    create_task,
    decoded_delta,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
)
from tests.support.rows import db_session

F32_MAX = float(np.finfo(np.float32).max)
HUGE = 0.6 * F32_MAX
#: 8-bit quantization, every value kept.
EIGHT_BIT = {"topk_fraction": 1.0, "bits": 8, "chunk": 256, "error_feedback": False}
SYNC = {"clients_per_round": 2, "over_selection": 0.0, "min_updates": 1, "num_rounds": 5}
ASYNC = {"mode": "async", "buffer_size": 2, "max_concurrency": 2, "num_rounds": 5}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scheduler_enabled": False})


@pytest.fixture
def stepper(coordinator: Coordinator) -> TaskStepper:
    runtime: Runtime = coordinator.app.state.runtime
    return TaskStepper(runtime)


def huge_delta(spec: ModelSpec) -> Weights:
    """Every value 0.6 x float32 max: two of them sum beyond float32."""
    return {t.name: np.full(t.shape, HUGE, np.float32) for t in spec.tensors}


def work_of(stepper: TaskStepper, task_id: int, device: TestDevice) -> dict[str, Any]:
    work = device.work()
    if work is None:  # async: the round opens on the engine's step
        stepper.step(task_id)
        work = device.work()
    assert work is not None
    return work


def assigned(
    stepper: TaskStepper, task_id: int, devices: list[TestDevice], n: int
) -> list[tuple[TestDevice, dict[str, Any]]]:
    """The first ``n`` of ``devices`` that have work (sync selection picks among them)."""
    out = []
    for device in devices:
        work = device.work()
        if work is None:
            stepper.step(task_id)  # async: a round opens on the engine's step
            work = device.work()
        if work is not None:
            out.append((device, work))
        if len(out) == n:
            return out
    raise AssertionError(f"only {len(out)} of {len(devices)} devices have work")


def upload_ok(device: TestDevice, work: dict[str, Any], body: bytes) -> dict[str, Any]:
    r = device.upload(work, body)
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


def refused(device: TestDevice, work: dict[str, Any], body: bytes, code: str) -> None:
    r = device.upload(work, body)
    assert (r.status_code, r.json()["error"]) == (422, code), r.text
    assert r.json()["detail"]


# ------------------------------------------------------------------------- values


def test_huge_values_are_refused_and_the_task_keeps_making_progress(
    coordinator: Coordinator, db: Db, stepper: TaskStepper
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(coordinator, aggregation=SYNC, compression=EIGHT_BIT)
        stepper.step(task_id)
        works = [work_of(stepper, task_id, d) for d in fleet]
        spec = spec_of(works[0])
        rng = np.random.default_rng(3)
        for device, work in zip(fleet, works, strict=True):
            body = make_update(work, delta=huge_delta(spec), num_examples=10, rng=rng)
            refused(device, work, body, "update_out_of_range")
        assert db.updates(task_id) == []
        assert {a.status for a in db.assignments(task_id)} == {"assigned"}

        for device, work in zip(fleet, works, strict=True):
            delta = random_delta(spec, rng)
            upload_ok(device, work, make_update(work, delta=delta, num_examples=10, rng=rng))
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        rnd = db.round(task_id, 1)
        assert rnd is not None and (rnd.status, rnd.result_version) == ("closed", 1)


# ------------------------------------------------------------ failed aggregation


@pytest.mark.parametrize("aggregation", [SYNC, ASYNC], ids=["sync", "async"])
def test_an_overflowing_aggregation_fails_its_round_once_and_the_next_opens(
    coordinator: Coordinator, db: Db, stepper: TaskStepper, aggregation: dict[str, Any]
) -> None:
    # The per-value bound out of the way; two 0.6 x max updates and a server step of 2 take
    # the new weights to 1.2 x float32 max.
    with fleet_of(coordinator, 4) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={**aggregation, "max_update_abs": F32_MAX, "server_lr": 2.0},
            compression=EIGHT_BIT,
        )
        stepper.step(task_id)
        rng = np.random.default_rng(4)
        first_pair = assigned(stepper, task_id, fleet, 2)
        for device, work in first_pair:
            body = make_update(work, delta=huge_delta(spec_of(work)), num_examples=10, rng=rng)
            upload_ok(device, work, body)

        for _ in range(5):  # the failure is settled once; later steps open the next round
            stepper.step(task_id)
        first = db.round(task_id, 1)
        assert first is not None and first.status == "failed"
        assert first.closed_at is not None and first.result_version is None
        assert first.status_reason is not None
        assert "aggregation failed" in first.status_reason
        assert "overflows float32" in first.status_reason
        assert first.num_rejected == 2
        updates = db.updates(task_id)
        assert [u.status for u in updates] == ["rejected", "rejected"]
        assert all(u.reason == first.status_reason for u in updates)
        assert [r.status for r in db.rounds(task_id)] == ["failed", "open"]
        second = db.round(task_id, 2)
        assert second is not None and second.base_version == 0
        assert db.task(task_id).current_version == 0
        assert db.task(task_id).status == "running"

        # The task makes progress with ordinary updates.
        # (Async: a device works once per version, so two others take round 2.)
        used = {d.device_id for d, _ in first_pair}
        others = [d for d in fleet if d.device_id not in used]
        for device, work in assigned(
            stepper, task_id, others if aggregation is ASYNC else fleet, 2
        ):
            assert work["round_id"] == second.id
            delta = random_delta(spec_of(work), rng)
            upload_ok(device, work, make_update(work, delta=delta, num_examples=10, rng=rng))
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        second = db.round(task_id, 2)
        assert second is not None and (second.status, second.result_version) == ("closed", 1)


# ---------------------------------------------------------------- num_examples

THREE = {"clients_per_round": 3, "over_selection": 0.0, "min_updates": 1, "num_rounds": 5}


def _round(
    stepper: TaskStepper, task_id: int, fleet: Fleet, claims: list[int], rng: np.random.Generator
) -> tuple[list[Weights], list[dict[str, Any]]]:
    """Each device of ``fleet`` uploads a random delta claiming ``claims[i]`` examples."""
    deltas, answers = [], []
    for device, claim in zip(fleet, claims, strict=True):
        work = work_of(stepper, task_id, device)
        spec = spec_of(work)
        body = make_update(
            work,
            delta=random_delta(spec, rng),
            num_examples=claim,
            metrics={"train_loss": 1.0 if claim > 100 else 0.5},
        )
        answers.append(upload_ok(device, work, body))
        deltas.append(decoded_delta(body, spec))
    return deltas, answers


def test_a_claim_above_the_cap_is_refused_and_one_above_the_history_counts_at_the_bound(
    coordinator: Coordinator, db: Db, stepper: TaskStepper
) -> None:
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(coordinator, aggregation={**THREE, "max_num_examples": 1_000_000})
        stepper.step(task_id)
        rng = np.random.default_rng(5)
        work = work_of(stepper, task_id, fleet[0])
        delta = random_delta(spec_of(work), rng)
        for claim in (2**63 - 1, 1_000_001):
            body = make_update(work, delta=delta, num_examples=claim)
            refused(fleet[0], work, body, "num_examples_out_of_range")
        assert db.updates(task_id) == []

        _round(stepper, task_id, fleet, [100, 100, 100], rng)
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1

        # Device 0 claims 10,000 times its history: it counts 4 x 100.
        deltas, answers = _round(stepper, task_id, fleet, [1_000_000, 100, 100], rng)
        assert [a["weight"] for a in answers] == [400.0, 100.0, 100.0]
        assert [a["num_examples_counted"] for a in answers] == [400, 100, 100]
        rows = db.updates(task_id)[3:]
        assert [(u.num_examples, u.num_examples_counted) for u in rows] == [
            (1_000_000, 400),
            (100, 100),
            (100, 100),
        ]
        # A repeat of the upload answers the same (counted) weight.
        first = rows[0]
        assert first.assignment_id is not None
        again = fleet[0].post(
            f"/api/v1/device/assignments/{first.assignment_id}/update",
            content=db.blobs.get(first.blob_digest),
            headers={"Idempotency-Key": first.idempotency_key},
        )
        assert (again.status_code, again.json()["weight"]) == (200, 400.0)
        assert again.json()["num_examples_counted"] == 400

        stepper.step(task_id)
        assert db.task(task_id).current_version == 2
        applied = db.updates(task_id)[3:]
        assert [u.weight for u in applied] == [400.0, 100.0, 100.0]  # share 2/3, not ~1
        # The round's train loss weighs the counted examples too (not the claim of 1,000,000).
        metrics = db.version(task_id, 2).metrics  # type: ignore[union-attr]
        assert metrics["train_examples"] == 600
        assert metrics["train_loss"] == pytest.approx((400 * 1.0 + 200 * 0.5) / 600)
        assert_weights_equal(
            db.weights(task_id, 2), expected_model(db.weights(task_id, 1), deltas, [400, 100, 100])
        )


def test_a_first_claim_far_above_the_cohort_is_clipped_at_aggregation(
    coordinator: Coordinator, db: Db, stepper: TaskStepper
) -> None:
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(coordinator, aggregation=THREE)
        stepper.step(task_id)
        rng = np.random.default_rng(6)
        deltas, answers = _round(stepper, task_id, fleet, [1_000_000, 100, 100], rng)
        # No history yet: the answer counts the whole claim (within the task cap).
        assert answers[0]["weight"] == 1_000_000.0
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        bound = examples.COHORT_FACTOR * 100
        assert [u.weight for u in db.updates(task_id)] == [bound, 100.0, 100.0]
        assert_weights_equal(
            db.weights(task_id, 1),
            expected_model(db.weights(task_id, 0), deltas, [bound, 100, 100]),
        )


def test_the_history_is_the_devices_last_accepted_or_applied_counts_in_the_task(
    coordinator: Coordinator,
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(coordinator, aggregation=THREE, start=False)
        other_task = create_task(coordinator, aggregation=THREE, start=False)
        me, other = fleet[0].device_id, fleet[1].device_id
        rows: list[tuple[int, str, int, int | None, str]] = [
            (task_id, me, 5_000, 5_000, "applied"),  # older than the last 10
            *[(task_id, me, 10 * i, 10 * i, "applied") for i in range(1, 9)],
            (task_id, me, 900, 900, "rejected"),  # not counted
            (task_id, me, 20_000_000, None, "accepted"),  # before the column: claim capped
            (task_id, me, 70, 70, "accepted"),
            (task_id, other, 100_000, 100_000, "accepted"),  # another device
            (other_task, me, 100_000, 100_000, "applied"),  # another task
        ]
        with db_session(coordinator.settings) as s:
            for i, (task, device, claim, counted, status) in enumerate(rows):
                s.add(
                    Update(
                        task_id=task,
                        device_id=device,
                        base_version=0,
                        num_examples=claim,
                        num_examples_counted=counted,
                        blob_digest="0" * 64,
                        byte_size=1,
                        staleness=0,
                        weight=1.0,
                        status=status,
                        idempotency_key=f"k{i}",
                    )
                )
            s.flush()
            cap = 1_000_000
            history = examples.device_history(s, task_id=task_id, device_id=me, cap=cap)
            assert history == [70, cap, 80, 70, 60, 50, 40, 30, 20, 10]
            # The other device's history in the task is [100_000]: a claim counts 4 x that.
            grown = examples.counted_examples(
                s, task_id=task_id, device_id=other, claimed=cap, cap=cap
            )
            assert grown == 400_000
            small = examples.counted_examples(
                s, task_id=task_id, device_id=me, claimed=500, cap=cap
            )
            assert small == 500
            # No history in the other task: the whole claim counts.
            fresh = examples.counted_examples(
                s, task_id=other_task, device_id=other, claimed=cap, cap=cap
            )
            assert fresh == cap


# ------------------------------------------------------------------ unit: the rule


@pytest.mark.parametrize(
    ("claimed", "history", "counted"),
    [
        (1_000_000, [], 1_000_000),  # a first claim: only the task cap applies
        (1_000_000, [100], 400),
        (1_000_000, [100, 300, 50], 1200),
        (1000, [100, 300, 50], 1000),
        (40, [10], 40),
        (7, [100], 7),
    ],
)
def test_a_claim_counts_at_most_growth_times_the_recent_maximum(
    claimed: int, history: list[int], counted: int
) -> None:
    assert examples.GROWTH == 4
    assert examples.bounded_by_history(claimed, history) == counted


@pytest.mark.parametrize(
    ("counts", "clipped"),
    [
        ([], []),
        ([5], [5]),
        ([100, 1_000_000], [100, 400]),  # the lower median: the large claim cannot set it
        ([1_000_000, 100, 100], [400, 100, 100]),
        ([10, 20, 30, 40, 1000], [10, 20, 30, 40, 120]),
        ([10, 25, 40], [10, 25, 40]),
    ],
)
def test_counts_are_clipped_to_a_multiple_of_the_lower_median(
    counts: list[int], clipped: list[int]
) -> None:
    assert examples.COHORT_FACTOR == 4
    assert examples.cohort_clip(counts).tolist() == clipped


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_one_devices_share_of_the_examples_is_bounded_whatever_it_claims(n: int) -> None:
    rng = np.random.default_rng(n)
    c = examples.COHORT_FACTOR
    for _ in range(50):
        counts = rng.integers(1, 1000, size=n)
        counts[rng.integers(n)] = 2**53  # one absurd claim
        clipped = examples.cohort_clip(counts).astype(np.float64)
        share = clipped.max() / clipped.sum()
        k = n - (n - 1) // 2  # counts at or above the lower median
        assert share <= c / (c + k - 1) + 1e-12


# --------------------------------------------------------------- unit: config keys


def test_the_api_and_the_engine_agree_on_the_bounds_keys() -> None:
    assert FLOAT32_MAX == F32_MAX
    api = task_schemas.AggregationConfig()
    engine = AggregationConfig.from_dict({})
    assert (api.max_update_abs, api.max_num_examples) == (
        engine.max_update_abs,
        engine.max_num_examples,
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_update_abs", 1e-12),
        ("max_update_abs", 1.0),
        ("max_update_abs", F32_MAX),
        ("max_num_examples", 1),
        ("max_num_examples", 2**53),
    ],
)
def test_both_accept_the_bounds_limits(key: str, value: float) -> None:
    assert getattr(task_schemas.AggregationConfig.model_validate({key: value}), key) == value
    assert getattr(AggregationConfig.from_dict({key: value}), key) == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_update_abs", 0.0),
        ("max_update_abs", -1.0),
        ("max_update_abs", 1e39),
        ("max_num_examples", 0),
        ("max_num_examples", 2**53 + 1),
    ],
)
def test_both_refuse_bounds_beyond_their_limits(key: str, value: float) -> None:
    with pytest.raises(ValidationError):
        task_schemas.AggregationConfig.model_validate({key: value})
    with pytest.raises(ConfigError, match=key):
        AggregationConfig.from_dict({key: value})


# ------------------------------------------------------------ unit: compute's checks

SPEC = ModelSpec.from_dict([{"name": "w", "shape": [4, 3]}, {"name": "b", "shape": [3]}])
DENSE = CompressionPolicy.from_dict(
    {"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False}
)


def _plan(
    blobs: BlobStore, values: list[float], *, weights: list[float] | None = None, **cfg: Any
) -> apply.Plan:
    """A plan over one dense update per value (every entry of the update = the value)."""
    base = blobs.put(encode_model({t.name: np.zeros(t.shape, np.float32) for t in SPEC.tensors}))
    rng = np.random.default_rng(0)
    items = []
    for i, v in enumerate(values):
        delta = {t.name: np.full(t.shape, v, np.float32) for t in SPEC.tensors}
        data = encode_update(
            compress(delta, DENSE, rng), task_id=1, base_version=0, num_examples=i + 1
        )
        w = 1.0 if weights is None else weights[i]
        items.append(apply.PlannedUpdate(i + 1, blobs.put(data), w, 0))
    return apply.Plan(
        task_id=1,
        round_id=1,
        base_version=0,
        base_digest=base,
        base_broadcast_digest=base,
        state_digest=None,
        spec=SPEC,
        policy=DENSE,
        model_config=dict(SMALL_MODEL),
        config=AggregationConfig.from_dict(cfg),
        items=tuple(items),
    )


def _blob_count(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("values", "weights", "cfg", "message"),
    [
        ([HUGE, HUGE], None, {"server_lr": 2.0}, "overflows float32"),
        ([HUGE, HUGE], None, {"strategy": "fedavgm", "server_lr": 2.0}, "overflows float32"),
        ([F32_MAX, F32_MAX], [1e300, 1e300], {}, "weighted mean update is not finite"),
    ],
    ids=["fedavg", "fedavgm", "mean"],
)
def test_compute_fails_an_aggregation_whose_result_is_not_finite(
    tmp_path: Path, values: list[float], weights: list[float] | None, cfg: dict, message: str
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    plan = _plan(blobs, values, weights=weights, **cfg)
    before = _blob_count(tmp_path / "blobs")
    with pytest.raises(apply.AggregationFailed, match=message) as info:
        apply.compute(plan, blobs, hook=None)
    assert "tensor" in info.value.reason
    assert _blob_count(tmp_path / "blobs") == before  # no model or state blob written


def test_compute_keeps_a_large_but_finite_result(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    plan = _plan(blobs, [HUGE, HUGE])  # 0.6 x max: representable
    result = apply.compute(plan, blobs, hook=None)
    assert result.total_weight == 2.0
