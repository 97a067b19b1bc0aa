"""Parts of an aggregation (fedge.coordinator.engine.apply) on real rows and blobs, both
backends: the per-device clip counts a commit adds; the compressed broadcast a computation
stores (reproducible for a retried aggregation, its sizes those of the blobs, and the ways it
fails); a secure round's plan and model (its unmasked sum, none of the uploads); stored
updates decoded under the computation's limits and the plan's policy; what a commit stores
(the weights used, the version's device metrics, clip and Multi-Krum counts)."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import event, insert, select, text, update
from sqlalchemy.exc import OperationalError

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import apply, robust, rounds, secure
from fedge.coordinator.engine.aggregate import BadStoredUpdate, WeightedBlob, iter_decoded
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.modelio import load_weights, store_weights
from fedge.coordinator.engine.strategies import make_strategy, state_to_bytes
from fedge.coordinator.models import Device, ModelVersion, Round, SecAggRound, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.shared.broadcast import make_delta
from fedge.shared.limits import Limits
from fedge.shared.policy import CompressionPolicy
from fedge.shared.secagg import flatten
from fedge.shared.wire import WireFormatError
from tests.coordinator.test_apply_guards import _commit, _computed, _plan, _task_with_uploads
from tests.support.engine import first_round_with_uploads
from tests.support.rounds import EXACT, SMALL_MODEL


def _devices(runtime: Runtime, counters: dict[str, int | None]) -> None:
    with session_scope(runtime.sessions) as session:
        for device_id, clipped in counters.items():
            session.execute(
                insert(Device).values(
                    id=device_id,
                    name=device_id,
                    public_key=f"key of {device_id}",
                    status="active",
                    enrolled_at=utcnow(),
                )
            )
            session.execute(
                update(Device).where(Device.id == device_id).values(num_norm_clipped=clipped)
            )


def _clipped(runtime: Runtime) -> dict[str, int | None]:
    with session_scope(runtime.sessions, read_only=True) as session:
        return {d: n for d, n in session.execute(select(Device.id, Device.num_norm_clipped))}


def _count(runtime: Runtime, devices: list[str], scales: tuple[float, ...]) -> None:
    items = tuple(apply.PlannedUpdate(i, "d", 1.0, 0, d) for i, d in enumerate(devices))
    with session_scope(runtime.sessions) as session:
        apply._count_clipped(
            session,
            SimpleNamespace(items=items),  # type: ignore[arg-type]
            SimpleNamespace(scales=scales),  # type: ignore[arg-type]
        )


def test_clip_counts_add_per_device_to_what_was_there(runtime: Runtime) -> None:
    _devices(runtime, {"a": 2, "b": None, "c": 0})
    # a: two of its updates scaled down in one aggregation (a straggler and a fresh one);
    # b: one, on a counter never set; c: scaled by 1.0, which is no clip.
    _count(runtime, ["a", "b", "a", "c"], (0.5, 0.25, 0.999, 1.0))
    assert _clipped(runtime) == {"a": 4, "b": 1, "c": 0}


def test_an_aggregation_without_scales_counts_nothing(runtime: Runtime) -> None:
    """Under differential privacy (or secure aggregation) no per-update scales are known:
    nothing is counted, and nothing fails."""
    _devices(runtime, {"a": 1})
    _count(runtime, ["a", "a"], ())
    _count(runtime, ["a", "a"], (0.5,))  # only what has a scale counts
    assert _clipped(runtime) == {"a": 2}


def _lossy(plan: apply.Plan, **changes: object) -> apply.Plan:
    """The plan with compressed downloads: half the values at 2 bits, so several values
    share a chunk and their stochastic rounding depends on the generator (with one value per
    chunk it would not: that value is its chunk's scale)."""
    policy = CompressionPolicy.from_dict(
        {**EXACT, "download": {"topk_fraction": 0.5, "bits": 2, "chunk": 64}}
    )
    return dataclasses.replace(plan, policy=policy, **changes)


def test_a_recomputed_broadcast_is_the_same_blobs(runtime: Runtime) -> None:
    """The quantization of the broadcast delta is seeded by (task, version): a retried
    aggregation stores the same delta and model (the delta ``make_delta`` gives with that
    seed), and the sizes are the blobs' own."""
    _, computed, _ = _computed(runtime, 5, seed=3)
    plan = _lossy(computed)
    result = apply.compute(plan, runtime.blobs, hook=None)
    first = result.broadcast
    again = apply.compute(plan, runtime.blobs, hook=None).broadcast
    assert first is not None and first == again
    data, rebuilt = make_delta(
        load_weights(runtime.blobs, result.model_digest, plan.spec),
        load_weights(runtime.blobs, plan.base_broadcast_digest, plan.spec),
        plan.policy.download,
        np.random.default_rng([plan.task_id, plan.new_version]),
        spec=plan.spec,
        task_id=plan.task_id,
        from_version=plan.base_version,
        to_version=plan.new_version,
    )
    assert runtime.blobs.get(first.delta_digest) == data
    assert store_weights(runtime.blobs, rebuilt)[0] == first.digest
    assert first.size == len(runtime.blobs.get(first.digest))
    assert first.delta_size == len(runtime.blobs.get(first.delta_digest))
    assert first.delta_size < first.size  # half the values, 2 bits each


def test_the_computation_takes_updates_decoded_at_upload_from_memory_once(
    runtime: Runtime,
) -> None:
    """An update decoded when it was accepted is aggregated from the decoded cache, not read
    and decoded from its blob again, to the same model; it is taken out as it is used, and
    the blob store stays the record (a second computation needs the blobs)."""
    task_id, _ = _task_with_uploads(runtime, np.random.default_rng(21), seed=9)
    plan = _plan(runtime, task_id)
    assert plan is not None
    reference = apply.compute(plan, runtime.blobs, hook=None)
    assert reference.total_weight == pytest.approx(sum(item.weight for item in plan.items))
    digests = [item.digest for item in plan.items]
    assert len(runtime.decoded) == len(digests) == len(set(digests))
    for digest in digests:
        assert runtime.blobs.delete(digest)
    result = apply.compute(plan, runtime.blobs, hook=None, decoded=runtime.decoded)
    assert result.model_digest == reference.model_digest
    assert len(runtime.decoded) == 0 and runtime.decoded.hits == len(digests)
    with pytest.raises(BadStoredUpdate) as err:
        apply.compute(plan, runtime.blobs, hook=None, decoded=runtime.decoded)
    assert err.value.index == 0 and "missing from the blob store" in err.value.detail


def test_a_commit_locks_its_rows_without_blocking_references_to_them(runtime: Runtime) -> None:
    """On PostgreSQL a commit locks the task row and its updates' rows ``FOR NO KEY UPDATE``:
    another transaction's foreign-key check on them (``FOR KEY SHARE``, as an upload's insert
    of a row naming the task takes) goes on while the commit holds them, where ``FOR UPDATE``
    would make it wait for the whole commit. Probed with ``NOWAIT`` from a second connection
    right after each lock is taken. (SQLite has no row locks: its write lock serializes.)"""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's; SQLite serializes writers")
    _, plan, result = _computed(runtime, 23, seed=10)
    probes: list[tuple[str, str]] = []

    def probe(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if " FOR " not in statement or "NOWAIT" in statement:
            return
        table = next((t for t in ("tasks", "updates") if f"FROM {t}" in statement), None)
        if table is None:
            return
        row = plan.task_id if table == "tasks" else plan.items[0].update_id
        with runtime.engine.connect() as other:
            try:
                other.execute(
                    text(f"SELECT id FROM {table} WHERE id = :id FOR KEY SHARE NOWAIT"),
                    {"id": row},
                )
                probes.append((table, "granted"))
            except OperationalError:
                probes.append((table, "blocked"))
            other.rollback()

    event.listen(runtime.engine, "after_cursor_execute", probe)
    try:
        assert _commit(runtime, plan, result) is not None
    finally:
        event.remove(runtime.engine, "after_cursor_execute", probe)
    assert {table for table, _ in probes} == {"tasks", "updates"}
    assert all(outcome == "granted" for _, outcome in probes), probes


def _configured(plan: apply.Plan, **changes: object) -> apply.Plan:
    """``plan`` with its aggregation settings changed as given."""
    config = AggregationConfig.from_dict({**plan.config.model_dump(), **changes})
    return dataclasses.replace(plan, config=config)


def _with_state(plan: apply.Plan, runtime: Runtime, strategy: str, state: dict) -> apply.Plan:
    """``plan`` under ``strategy`` whose stored optimizer state is ``state``."""
    return dataclasses.replace(
        _configured(plan, strategy=strategy), state_digest=runtime.blobs.put(state_to_bytes(state))
    )


def test_the_stored_optimizer_state_moves_the_model_and_a_non_finite_one_fails(
    runtime: Runtime,
) -> None:
    """The computation steps from the task's stored optimizer state: a momentum buffer of
    1e300 (a corrupted state blob) takes the model beyond float32, and a second moment that
    is infinite leaves the model finite (its step is 0) but the new state not; each fails the
    computation naming the version or the state and the first bad tensor."""
    _, plan, _ = _computed(runtime, 24, seed=14)
    w, b = (t.shape for t in plan.spec.tensors)
    momentum = _with_state(plan, runtime, "fedavgm", {"m/W": np.full(w, 1e300), "m/b": np.zeros(b)})
    with pytest.raises(apply.AggregationFailed) as err:
        apply.compute(momentum, runtime.blobs, hook=None)
    assert str(err.value) == (
        f"the new model (version {plan.new_version}) overflows float32: "
        f"tensor 'W' has {int(np.prod(w))} NaN or infinite value(s)"
    )
    adam = _with_state(
        plan,
        runtime,
        "fedadam",
        {"m/W": np.zeros(w), "v/W": np.full(w, np.inf), "m/b": np.zeros(b), "v/b": np.ones(b)},
    )
    with pytest.raises(apply.AggregationFailed) as err:
        apply.compute(adam, runtime.blobs, hook=None)
    assert str(err.value) == (
        "the new server optimizer state is not finite: "
        f"tensor 'v/W' has {int(np.prod(w))} NaN or infinite value(s)"
    )


def test_a_base_model_of_another_shape_is_refused(runtime: Runtime) -> None:
    """The base model is read against the task's model spec: a version row naming a model of
    other shapes (one that numpy would broadcast the step onto) is refused, never stepped."""
    _, plan, _ = _computed(runtime, 25, seed=15)
    other = {t.name: np.zeros((1, *t.shape[1:]), np.float32) for t in plan.spec.tensors}
    digest, _ = store_weights(runtime.blobs, other)
    with pytest.raises(WireFormatError) as err:
        apply.compute(dataclasses.replace(plan, base_digest=digest), runtime.blobs, hook=None)
    assert err.value.code == "shape_mismatch"


def test_the_evaluation_hook_runs_every_eval_every_versions_and_at_the_last(
    runtime: Runtime,
) -> None:
    """With ``eval_every = 2`` of 5 rounds the server-side evaluation hook sees the new model
    (and the task's model configuration) at versions 2, 4 and 5 (the last), and the version's
    server metrics are what it returned; at the others it is not called."""
    _, plan, _ = _computed(runtime, 26, seed=16, num_rounds=5)
    every_2 = _configured(plan, eval_every=2)
    seen: list[tuple[dict[str, object], dict[str, np.ndarray]]] = []

    def hook(model_config: dict[str, object], weights: dict[str, np.ndarray]) -> dict[str, float]:
        seen.append((model_config, weights))
        return {"accuracy": 0.25 * len(seen)}

    ran = []
    for base in range(5):
        versioned = dataclasses.replace(every_2, base_version=base)
        result = apply.compute(versioned, runtime.blobs, hook=hook)
        if result.server_metrics:
            ran.append(base + 1)
            assert result.server_metrics == {"accuracy": 0.25 * len(seen)}
            model_config, weights = seen[-1]
            assert model_config == plan.model_config
            got = load_weights(runtime.blobs, result.model_digest, plan.spec)
            assert all(np.array_equal(weights[t], got[t]) for t in got)
    assert ran == [2, 4, 5] and len(seen) == 3


def test_the_computations_timings_are_its_parts_durations(runtime: Runtime) -> None:
    """``aggregate``, ``step``, ``store`` and ``eval`` are durations of the parts, in order:
    none negative, together no longer than the call."""
    _, plan, _ = _computed(runtime, 27, seed=17)
    start = time.perf_counter()
    result = apply.compute(plan, runtime.blobs, hook=None)
    elapsed = time.perf_counter() - start
    assert list(result.timings) == ["aggregate", "step", "store", "eval"]
    assert all(t >= 0 for t in result.timings.values())
    assert sum(result.timings.values()) <= elapsed


def test_planning_without_the_current_model_version_stops_with_the_task_and_version(
    runtime: Runtime,
) -> None:
    """A task whose current version has no stored model (a damaged database) cannot be
    planned: the error names the task and the version (nothing else is read or written)."""
    task_id, _ = _task_with_uploads(runtime, np.random.default_rng(28), seed=18)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        task.current_version = 7
        cfg = AggregationConfig.from_dict(task.aggregation)
        with pytest.raises(RuntimeError) as err:
            apply.plan_aggregation(session, task, rnd, cfg)
        session.rollback()
    assert str(err.value) == f"task {task_id} has no stored model version 7"


def test_a_plan_weighs_the_counted_examples_in_the_order_the_task_asks(runtime: Runtime) -> None:
    """Three updates claiming 10, 20 and 30 examples (``max_num_examples`` 35): the weight is
    the stored count (12 where the row says so, rather than the claim), for a row without one
    (written before the column existed; its claim made 40) the claim capped at 35, and 1 each
    under ``equal`` weighting. Planned in the order received, or in assignment order with a
    ``selection_seed`` (received here in the reverse order)."""
    task_id, uploaded = first_round_with_uploads(
        runtime,
        np.random.default_rng(29),
        n=3,
        num_examples=lambda i: (10, 20, 30)[i],
        aggregation={"max_num_examples": 35},
        prefix="w-",
    )
    first, second, third = (u.update_id for u in uploaded)
    with session_scope(runtime.sessions) as session:
        session.execute(update(Update).where(Update.id == first).values(num_examples_counted=12))
        session.execute(
            update(Update)
            .where(Update.id == third)
            .values(num_examples=40, num_examples_counted=None)
        )
        received = {
            i: session.scalar(select(Update.received_at).where(Update.id == i))
            for i in (first, second, third)
        }
        for i, j in ((first, third), (third, first)):  # the first received last
            session.execute(update(Update).where(Update.id == i).values(received_at=received[j]))
        assignments = dict(
            session.execute(
                select(Update.id, Update.assignment_id).where(Update.task_id == task_id)
            ).all()
        )
    by_assignment = sorted((first, second, third), key=assignments.__getitem__)
    weights = {first: 12.0, second: 20.0, third: 35.0}
    state = runtime.blobs.put(state_to_bytes({"m/b": np.ones(3)}))
    with session_scope(runtime.sessions) as session:
        session.execute(update(Task).where(Task.id == task_id).values(optimizer_state_digest=state))
    plan = _plan(runtime, task_id)
    assert plan is not None
    assert plan.state_digest == state  # the task's server optimizer state goes with the plan
    assert [(i.update_id, i.weight) for i in plan.items] == [
        (u, weights[u]) for u in (third, second, first)
    ]
    seeded = _plan(runtime, task_id, selection_seed=5)
    assert seeded is not None
    assert [i.update_id for i in seeded.items] == by_assignment
    equal = _plan(runtime, task_id, weighting="equal")
    assert equal is not None and [i.weight for i in equal.items] == [1.0, 1.0, 1.0]


SECURE = {"bound": 0.5, "grid_bits": 16, "planned_dropout": 0.34}


def _secure_round(runtime: Runtime, task_id: int, total: np.ndarray | None) -> None:
    """The task's active round as a secure one: its row, unmasked with ``total`` of three
    inputs (None: not unmasked yet)."""
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert task is not None and rnd is not None
        size, k = secure.support_size(task)
        session.add(
            SecAggRound(
                round_id=rnd.id,
                task_id=task_id,
                seed=b"\x07" * 32,
                cohort=3,
                degree=2,
                threshold=2,
                size=size,
                k=k,
                grid_bound=SECURE["bound"],
                grid_bits=SECURE["grid_bits"],
                support_kind="random",
                support_version=0,
                phase="done" if total is not None else "masked",
                phase_deadline_at=utcnow(),
                result_sum=None if total is None else total.astype("<u4").tobytes(),
                num_included=None if total is None else 3,
            )
        )


def _secure_plan(runtime: Runtime, task_id: int) -> apply.Plan | None:
    return _plan(runtime, task_id, secure=SECURE, weighting="equal", min_updates=2)


def test_a_secure_round_applies_its_unmasked_sum_and_nothing_else(runtime: Runtime) -> None:
    """The plan of a secure round holds its stored sum, none of the uploads; the new model is
    ``float32(w0 + sum * step / count)`` on the round's support, ``w0`` elsewhere, bit for bit.
    Before the sum is stored there is nothing to plan."""
    task_id, _ = _task_with_uploads(runtime, np.random.default_rng(8), seed=4)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        size, k = secure.support_size(task)
    signed = np.random.default_rng(9).integers(-3000, 3000, size=k)
    _secure_round(runtime, task_id, None)
    assert _secure_plan(runtime, task_id) is None
    with session_scope(runtime.sessions) as session:
        session.execute(
            update(SecAggRound).values(
                phase="done", result_sum=signed.astype("<u4").tobytes(), num_included=3
            )
        )
    plan = _secure_plan(runtime, task_id)
    assert plan is not None and plan.items == () and plan.secure_sum is not None
    assert plan.secure_sum.count == 3
    result = apply.compute(plan, runtime.blobs, hook=None)
    assert (result.norms, result.scales, result.num_rejected) == ((), (), None)
    assert result.total_weight == 3.0  # every included device weighs the same
    w0 = load_weights(runtime.blobs, plan.base_digest, plan.spec)
    got = load_weights(runtime.blobs, result.model_digest, plan.spec)
    cfg = plan.secure_sum.config
    mean = np.zeros(size)
    mean[cfg.support] = signed * (cfg.grid.step / 3)
    want = (flatten(w0, plan.spec).astype(np.float64) + mean).astype(np.float32)
    np.testing.assert_array_equal(flatten(got, plan.spec), want)
    _commit(runtime, plan, result)
    assert _version_metrics(runtime, task_id, 1)["secagg_included"] == 3.0


def _version_metrics(runtime: Runtime, task_id: int, version: int) -> dict[str, float]:
    with session_scope(runtime.sessions, read_only=True) as session:
        row = session.scalar(
            select(ModelVersion).where(
                ModelVersion.task_id == task_id, ModelVersion.version == version
            )
        )
        assert row is not None
        return dict(row.metrics)


def test_stored_updates_are_decoded_under_the_given_limits(runtime: Runtime) -> None:
    """A computation under tighter decoding limits than the defaults applies them to every
    stored update (not the decoded cache, filled under the defaults)."""
    _, plan, _ = _computed(runtime, 11, seed=6)
    with pytest.raises(BadStoredUpdate) as err:
        apply.compute(plan, runtime.blobs, hook=None, limits=Limits(max_total_elements=14))
    assert err.value.index == 0
    assert "exceed" in err.value.detail and "14" in err.value.detail
    assert apply.compute(plan, runtime.blobs, hook=None, limits=Limits(max_total_elements=15))


def test_an_update_blob_of_another_model_fails_the_computation(runtime: Runtime) -> None:
    """An update row naming a blob of another task's model (a corrupted row) fails the
    computation naming the blob; it is never added under this task's shapes."""
    _, plan, _ = _computed(runtime, 12, seed=7)
    _, other, _ = _computed_with(runtime, {**SMALL_MODEL, "input_dim": 5, "seed": 8})
    wrong = dataclasses.replace(plan.items[1], digest=other.items[0].digest)
    with pytest.raises(BadStoredUpdate) as err:
        apply.compute(
            dataclasses.replace(plan, items=(plan.items[0], wrong)), runtime.blobs, hook=None
        )
    assert err.value.index == 1 and err.value.digest == wrong.digest


def _computed_with(
    runtime: Runtime, model: dict[str, object]
) -> tuple[int, apply.Plan, apply.Result]:
    task_id, _ = first_round_with_uploads(
        runtime, np.random.default_rng(13), n=2, model=model, prefix="other-"
    )
    plan = _plan(runtime, task_id)
    assert plan is not None
    return task_id, plan, apply.compute(plan, runtime.blobs, hook=None)


def test_a_commit_stores_the_weights_used_and_the_versions_device_metrics(
    runtime: Runtime,
) -> None:
    """Each applied update keeps the weight it entered the mean with (its examples clipped to
    a multiple of the cohort's median, which its weight at upload did not know), and the new
    version carries the device metrics of exactly its updates (``train_loss`` weighted by the
    counted examples)."""
    counts = [10, 20, 5000]
    task_id, uploaded = first_round_with_uploads(
        runtime,
        np.random.default_rng(14),
        n=3,
        # A bound every update exceeds: each enters clipped, and the version counts them.
        aggregation={"num_rounds": 3, "norm_bound": {"max_norm": 1e-3}},
        num_examples=lambda i: counts[i],
        prefix="m-",
    )
    losses = {u.update_id: 0.5 + i for i, u in enumerate(uploaded)}
    with session_scope(runtime.sessions) as session:
        for update_id, loss in losses.items():
            session.execute(
                update(Update).where(Update.id == update_id).values(metrics={"train_loss": loss})
            )
        before = {i: w for i, w in session.execute(select(Update.id, Update.weight))}
    plan = _plan(runtime, task_id)
    assert plan is not None
    _commit(runtime, plan, apply.compute(plan, runtime.blobs, hook=None))
    with session_scope(runtime.sessions, read_only=True) as session:
        after = {i: w for i, w in session.execute(select(Update.id, Update.weight))}
        counted = {i: n for i, n in session.execute(select(Update.id, Update.num_examples_counted))}
    metrics = _version_metrics(runtime, task_id, 1)
    assert after == {i.update_id: i.weight for i in plan.items}
    assert after != before  # the largest claim was clipped at aggregation
    total = sum(counted[i] for i in losses)
    want = sum(losses[i] * counted[i] for i in losses) / total
    assert metrics["train_loss"] == pytest.approx(want, rel=1e-12)
    assert metrics["train_examples"] == total
    assert metrics["num_clipped"] == 3.0
    assert "num_rejected" not in metrics  # the mean keeps every update: nothing to say


def test_a_broadcast_that_cannot_be_made_fails_the_computation(runtime: Runtime) -> None:
    """The step from a broadcast model at -3e38 to a new model near +3e38 overflows float32:
    the computation fails naming the version (a clean failure, not an infinite delta), and a
    broadcast model of another shape is refused as such before any delta is made."""
    _, plan, _ = _computed(runtime, 15, seed=9)
    w0 = load_weights(runtime.blobs, plan.base_digest, plan.spec)
    high, _ = store_weights(runtime.blobs, {n: np.full_like(w, 3e38) for n, w in w0.items()})
    low, _ = store_weights(runtime.blobs, {n: np.full_like(w, -3e38) for n, w in w0.items()})
    with pytest.raises(apply.AggregationFailed) as err:
        apply.compute(
            _lossy(plan, base_digest=high, base_broadcast_digest=low), runtime.blobs, hook=None
        )
    assert str(err.value) == (
        "the broadcast delta to version 1 cannot be made: the step from the broadcast model to "
        "version 1 overflows float32"
    )
    _, other, _ = _computed_with(runtime, {**SMALL_MODEL, "input_dim": 5, "seed": 10})
    with pytest.raises(WireFormatError) as wrong:
        apply.compute(
            _lossy(plan, base_broadcast_digest=other.base_digest), runtime.blobs, hook=None
        )
    assert wrong.value.code == "shape_mismatch"


def test_stored_updates_are_decoded_under_the_plans_policy(runtime: Runtime) -> None:
    """An update stored under another compression policy than the plan's (the task's
    compression was changed after it was accepted) fails the computation, naming the blob."""
    _, plan, _ = _computed(runtime, 16, seed=11)
    other = CompressionPolicy.from_dict({**EXACT, "bits": 8})
    with pytest.raises(BadStoredUpdate) as err:
        apply.compute(dataclasses.replace(plan, policy=other), runtime.blobs, hook=None)
    assert err.value.index == 0 and "policy" in err.value.detail


def test_a_multi_krum_commit_counts_the_updates_it_left_out(runtime: Runtime) -> None:
    """Five updates, f = 1, m = 3: the version says two were left out. (Other rules keep
    every update and say nothing of it: see the bound test above.)"""
    task_id, _ = first_round_with_uploads(
        runtime,
        np.random.default_rng(17),
        n=5,
        aggregation={
            "num_rounds": 3,
            "min_updates": 5,
            "robust": "multi_krum",
            "krum_byzantine": 1,
            "krum_select": 3,
        },
        prefix="k-",
    )
    plan = _plan(runtime, task_id)
    assert plan is not None
    result = apply.compute(plan, runtime.blobs, hook=None)
    assert result.num_rejected == 2
    # The task's f is the one applied: Multi-Krum at f = 1 (robust.combine) gives the model,
    # and the same updates at f = 0 (scores over one more neighbour) another one.
    combined = robust.combine(
        lambda: iter_decoded(
            runtime.blobs,
            (WeightedBlob(i.digest, i.weight) for i in plan.items),
            spec=plan.spec,
            policy=plan.policy,
        ),
        count=5,
        spec=plan.spec,
        method="multi_krum",
        krum_byzantine=1,
        krum_select=3,
    )
    w0 = load_weights(runtime.blobs, plan.base_digest, plan.spec)
    want, _ = make_strategy(plan.config).step(w0, combined.delta, None)
    got = load_weights(runtime.blobs, result.model_digest, plan.spec)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    f0 = _plan(runtime, task_id, krum_byzantine=0)
    assert f0 is not None and f0.items == plan.items
    assert apply.compute(f0, runtime.blobs, hook=None).model_digest != result.model_digest
    _commit(runtime, plan, result)
    assert _version_metrics(runtime, task_id, 1)["num_rejected"] == 2.0


def test_a_commit_records_the_version_and_closes_the_round(runtime: Runtime) -> None:
    """The version row (its broadcast blobs and sizes, its time) and the round's outcome (its
    close time, result version, updates received and stale ones) are what the plan and the
    computation say."""
    _, computed, _ = _computed(runtime, 18, seed=12)
    items = tuple(
        dataclasses.replace(item, tau=tau)
        for item, tau in zip(computed.items, (0, 1, 2), strict=True)
    )
    plan = _lossy(computed, items=items)  # two of the three planned as stale
    result = apply.compute(plan, runtime.blobs, hook=None)
    assert result.broadcast is not None
    now = utcnow().replace(microsecond=0) - timedelta(minutes=3)
    with session_scope(runtime.sessions) as session:
        apply.commit_aggregation(
            session, plan, result, now=now, liveness=Liveness(default_poll_s=20.0)
        )
    with session_scope(runtime.sessions, read_only=True) as session:
        version = session.scalar(
            select(ModelVersion).where(
                ModelVersion.task_id == plan.task_id, ModelVersion.version == 1
            )
        )
        rnd = session.get(Round, plan.round_id)
        assert version is not None and rnd is not None
        b = result.broadcast
        assert (version.broadcast_digest, version.broadcast_size) == (b.digest, b.size)
        assert (version.delta_digest, version.delta_size) == (b.delta_digest, b.delta_size)
        assert version.created_at == now and version.num_updates == 3
        assert (rnd.status, rnd.closed_at, rnd.result_version) == ("closed", now, 1)
        assert (rnd.num_received, rnd.num_stale) == (3, 2)


def _commit_first_round(
    runtime: Runtime, aggregation: dict[str, object], *, seed: int, server_metrics: dict[str, float]
) -> Task:
    """The first round of a task with ``aggregation`` computed (the server's evaluation
    replaced by ``server_metrics``) and committed: the task after it."""
    task_id, _ = first_round_with_uploads(
        runtime, np.random.default_rng(seed), n=3, aggregation=aggregation, prefix=f"f{seed}-"
    )
    plan = _plan(runtime, task_id)
    assert plan is not None
    result = apply.compute(plan, runtime.blobs, hook=None)
    _commit(runtime, plan, dataclasses.replace(result, server_metrics=server_metrics))
    with session_scope(runtime.sessions, read_only=True) as session:
        task = session.get(Task, task_id)
        assert task is not None
        session.expunge(task)
        return task


def test_a_task_ends_after_its_rounds_or_at_its_target_saying_why(runtime: Runtime) -> None:
    done = _commit_first_round(runtime, {"num_rounds": 1}, seed=19, server_metrics={})
    assert (done.status, done.status_reason) == ("completed", "1 aggregations done")
    target = {"num_rounds": 5, "target_metric": {"name": "server_accuracy", "value": 0.75}}
    early = _commit_first_round(runtime, target, seed=20, server_metrics={"accuracy": 0.8})
    assert (early.status, early.status_reason) == (
        "completed",
        "server_accuracy reached 0.75 at version 1",
    )
    on = _commit_first_round(runtime, target, seed=21, server_metrics={"accuracy": 0.7})
    assert (on.status, on.current_version) == ("running", 1)


def test_a_commit_keeps_the_server_optimizers_state_and_says_what_it_did(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedge.coordinator.events")
    _, computed, _ = _computed(runtime, 22, seed=13)
    plan = _configured(computed, strategy="fedadam", server_lr=0.1)
    result = apply.compute(plan, runtime.blobs, hook=None)
    assert result.state_digest is not None
    _commit(runtime, plan, result)
    with session_scope(runtime.sessions, read_only=True) as session:
        task = session.get(Task, plan.task_id)
        assert task is not None and task.optimizer_state_digest == result.state_digest
    events = {r.event: r for r in caplog.records if hasattr(r, "event")}
    closed, committed = events["round.closed"], events["version.committed"]
    assert (closed.task, closed.round, closed.version, closed.updates) == (
        plan.task_id,
        plan.round_id,
        1,
        3,
    )
    assert closed.number == 1
    assert (committed.task, committed.round, committed.version, committed.updates) == (
        plan.task_id,
        plan.round_id,
        1,
        3,
    )
    assert committed.size_bytes == result.model_size
    assert committed.metrics == _version_metrics(runtime, plan.task_id, 1)


def test_an_async_commit_opens_the_next_buffer_and_assigns_nobody(runtime: Runtime) -> None:
    """After an async aggregation the next round is a buffer on the new version (work is
    handed out on demand: nobody is assigned at the commit), opened at the commit's time; the
    closed round counts the updates the plan applied (two of the three here)."""
    _, computed, _ = _computed(runtime, 24, seed=14)
    cfg = AggregationConfig.from_dict(
        {**computed.config.model_dump(), "mode": "async", "buffer_size": 2}
    )
    plan = dataclasses.replace(computed, config=cfg, items=computed.items[:2])
    result = apply.compute(plan, runtime.blobs, hook=None)
    now = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    with session_scope(runtime.sessions) as session:
        assigned = apply.commit_aggregation(
            session, plan, result, now=now, liveness=Liveness(default_poll_s=20.0)
        )
    assert assigned == []
    with session_scope(runtime.sessions, read_only=True) as session:
        closed = session.get(Round, plan.round_id)
        after = session.scalars(
            select(Round).where(Round.task_id == plan.task_id, Round.id != plan.round_id)
        ).all()
        assert closed is not None and closed.num_received == 2
        [buffer] = after
        assert (buffer.status, buffer.base_version, buffer.opened_at) == ("open", 1, now)
        assert buffer.target_updates == 2
