"""One aggregation, in three steps, so that no transaction is held while numbers crunch:

1. :func:`plan_aggregation` (short transaction): pick the accepted updates to apply, reject
   those now beyond ``max_staleness``, and fix each update's weight with ``tau`` relative to
   the version being built on (``task.current_version``).
2. :func:`compute` (no transaction): stream the update blobs into one dense buffer, take the
   server step, write the new model blob (and optimizer state) to the content-addressed blob
   store, run the evaluation hook.
3. :func:`commit_aggregation` (short transaction): lock the task row, check that nothing
   moved (same current version, round still active, every planned update still
   ``accepted``), then commit together the new ``ModelVersion``, the updates' ``applied``
   marks, the round's closing and ``task.current_version``.

A crash anywhere leaves either the old state (plus, at most, an unreferenced blob) or the new
one; the next attempt plans again. Nothing is applied twice: step 3 only succeeds for updates
still ``accepted`` at the version they were planned against, and ``(task_id, version)`` is
unique.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.engine import bounds, examples, privacy, reports, rounds, secure
from fedge.coordinator.engine.aggregate import WeightedBlob, iter_decoded
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.decodedcache import DecodedCache
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.evalhook import EvalHook, run_hook
from fedge.coordinator.engine.modelio import load_state, load_weights, store_state, store_weights
from fedge.coordinator.engine.robust import combine
from fedge.coordinator.engine.staleness import update_weight
from fedge.coordinator.engine.strategies import make_strategy
from fedge.coordinator.events import emit
from fedge.coordinator.models import Device, ModelVersion, Round, Task, Update
from fedge.coordinator.states import ROUND_ACTIVE, TASK_LIVE, RoundStatus, TaskStatus, UpdateStatus
from fedge.shared.broadcast import make_delta
from fedge.shared.dp import secure_rng
from fedge.shared.limits import Limits
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy

#: Ids per ``IN (...)`` list: SQLite allows at most 32,766 bound parameters per statement, and
#: a round may hold up to 100,000 updates (``clients_per_round``, ``buffer_size``).
IN_BATCH = 10_000


class AggregationFailed(Exception):
    """The planned updates cannot make a usable model (e.g. the new weights leave float32's
    range); the scheduler fails the round with ``reason`` and rejects the updates instead of
    computing the same result again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RoundMoved(RuntimeError):
    """The round got another outcome while its aggregation was being committed (the
    transaction is rolled back; nothing of it is kept)."""


@dataclass(frozen=True, slots=True)
class PlannedUpdate:
    update_id: int
    digest: str
    weight: float
    tau: int
    device_id: str = ""


@dataclass(frozen=True)
class Plan:
    """Everything step 2 needs, detached from the database."""

    task_id: int
    round_id: int
    base_version: int
    base_digest: str
    #: The broadcast model of the base version (what devices hold; fedge.shared.broadcast).
    base_broadcast_digest: str
    state_digest: str | None
    spec: ModelSpec
    policy: CompressionPolicy
    model_config: dict[str, Any]
    config: AggregationConfig
    items: tuple[PlannedUpdate, ...]
    #: The L2 norm bound this aggregation applies (None: no bound; fedge.coordinator.engine.bounds).
    norm_bound: float | None = None
    #: Secure aggregation: the round's unmasked sum (``items`` is empty then).
    secure_sum: secure.SecureSum | None = None

    @property
    def num_updates(self) -> int:
        """The updates the new version is built from (devices in a secure sum)."""
        return len(self.items) if self.secure_sum is None else self.secure_sum.count

    @property
    def new_version(self) -> int:
        return self.base_version + 1


@dataclass(frozen=True)
class Broadcast:
    digest: str
    size: int
    delta_digest: str
    delta_size: int


@dataclass(frozen=True)
class Result:
    model_digest: str
    model_size: int
    state_digest: str | None
    total_weight: float
    server_metrics: dict[str, float]
    #: Compressed downloads only: the new broadcast model and the delta that leads to it.
    broadcast: Broadcast | None = None
    #: Seconds spent in each part of :func:`compute`: ``aggregate`` (read, decode and add every
    #: update), ``step`` (server optimizer), ``store`` (write model and state blobs), ``eval``.
    timings: dict[str, float] = field(default_factory=dict)
    #: Per planned update (in the plan's order): its L2 norm and the bound's scale factor.
    norms: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()
    #: The adaptive bound for the next aggregation (None: not adaptive).
    next_norm_bound: float | None = None
    #: Updates the robust rule left out entirely (``multi_krum``; None: no such rule).
    num_rejected: int | None = None

    @property
    def num_clipped(self) -> int:
        return sum(1 for s in self.scales if s < 1.0)


def plan_aggregation(
    session: Session, task: Task, rnd: Round, cfg: AggregationConfig
) -> Plan | None:
    """Choose the updates for the next version; ``None`` when there is nothing to do yet.

    Sync: every accepted update of the task (fresh ones plus stragglers of earlier rounds).
    Async: the ``buffer_size`` oldest accepted updates, and only once that many exist.
    Updates whose staleness relative to the current version exceeds ``max_staleness`` are
    rejected here (counted as ``num_rejected`` of the round). They are planned in arrival
    order; in assignment order when the task sets ``selection_seed`` (floating-point sums then
    add in the same order in every run of the experiment, not in the order uploads happened to
    arrive).
    """
    base = task.current_version
    model = session.scalar(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == base)
    )
    if model is None:
        raise RuntimeError(f"task {task.id} has no stored model version {base}")
    if cfg.secure is not None:
        return _secure_plan(session, task, rnd, cfg, model)
    # Plain columns, not ORM objects: a round of 10,000 updates would otherwise hold 10,000
    # tracked ``Update`` instances (with their metrics) in the session.
    pending = session.execute(
        select(
            Update.id,
            Update.blob_digest,
            Update.base_version,
            Update.num_examples,
            Update.num_examples_counted,
            Update.round_id,
            Update.device_id,
        )
        .where(Update.task_id == task.id, Update.status == UpdateStatus.ACCEPTED)
        .order_by(
            *(
                (Update.assignment_id, Update.id)
                if cfg.selection_seed is not None
                else (Update.received_at, Update.id)
            )
        )
    ).all()
    # (id, digest, tau, counted examples, device) of the updates to apply; weights once they
    # are known.
    chosen: list[tuple[int, str, int, int, str]] = []
    rejects: list[dict[str, Any]] = []
    dp = cfg.central_dp is not None
    for update_id, digest, base_version, num_examples, counted, round_id, device_id in pending:
        tau = max(0, base - base_version)
        if dp and round_id != rnd.id:
            # The accountant charges this round's sample only (docs/privacy.md).
            reason = f"differential privacy: not in the sample of round {rnd.number}"
            rejects.append({"id": update_id, "status": UpdateStatus.REJECTED, "reason": reason})
            continue
        if tau > cfg.max_staleness:
            reason = (
                f"staleness {tau} at aggregation of version {base + 1} exceeds "
                f"max_staleness {cfg.max_staleness}"
            )
            rejects.append({"id": update_id, "status": UpdateStatus.REJECTED, "reason": reason})
            continue
        count = examples.stored_count(counted, num_examples, cap=cfg.max_num_examples)
        chosen.append((update_id, digest, tau, count, device_id))
    if rejects:
        session.execute(update(Update), rejects)
        rounds.bump_round(session, rnd.id, num_rejected=len(rejects))
        session.flush()
    if cfg.mode == "async":
        if len(chosen) < cfg.buffer_size:
            return None
        chosen = chosen[: cfg.buffer_size]
    elif not chosen:
        return None
    # The weight counts the examples clipped to a multiple of the cohort's median
    # (fedge.coordinator.engine.examples), then discounts staleness.
    clipped = examples.cohort_clip([count for _, _, _, count, _ in chosen])
    items = [
        PlannedUpdate(
            update_id,
            digest,
            update_weight(cfg.staleness, tau=tau, num_examples=int(n), weighting=cfg.weighting),
            tau,
            device_id,
        )
        for (update_id, digest, tau, _, device_id), n in zip(chosen, clipped, strict=True)
    ]
    return _plan(
        task,
        rnd,
        cfg,
        model,
        items=tuple(items),
        norm_bound=bounds.current_bound(cfg.norm_bound, task.norm_bound),
    )


def _plan(
    task: Task, rnd: Round, cfg: AggregationConfig, model: ModelVersion, **parts: Any
) -> Plan:
    """The plan of an aggregation on the task's current version; ``parts``: what it applies
    (``items``, and ``norm_bound`` or ``secure_sum``)."""
    return Plan(
        task_id=task.id,
        round_id=rnd.id,
        base_version=task.current_version,
        base_digest=model.blob_digest,
        base_broadcast_digest=model.served_digest,
        state_digest=task.optimizer_state_digest,
        spec=ModelSpec.from_dict(task.model_spec),
        policy=CompressionPolicy.from_dict(task.compression),
        model_config=dict(task.model_config_),
        config=cfg,
        **parts,
    )


def _secure_plan(
    session: Session, task: Task, rnd: Round, cfg: AggregationConfig, model: ModelVersion
) -> Plan | None:
    """A secure-aggregation round's plan: its unmasked sum, no individual updates."""
    result = secure.secure_sum(session, rnd)
    if result is None:
        return None
    return _plan(task, rnd, cfg, model, items=(), secure_sum=result)


def compute(
    plan: Plan,
    blobs: BlobStore,
    *,
    hook: EvalHook | None,
    limits: Limits | None = None,
    decoded: DecodedCache | None = None,
    noise_rng: np.random.Generator | None = None,
) -> Result:
    """Aggregate the planned updates and write the new model (no database access).

    Under central differential privacy the mean is DP-FedAvg's (clipped updates, fixed
    denominator, Gaussian noise drawn from ``noise_rng``, by default a CSPRNG-seeded one;
    :mod:`fedge.coordinator.engine.privacy`). Otherwise each update is clipped to the plan's
    norm bound, then the updates are combined as the task's ``robust`` setting says
    (fedge.coordinator.engine.robust); sync rounds and async buffers alike.

    :class:`AggregationFailed` when the combined update, the new weights (as float32) or the
    optimizer state is not finite: no blob is written then."""
    kwargs = {} if limits is None else {"limits": limits}
    start = time.perf_counter()
    cfg = plan.config
    dp = cfg.central_dp

    def source() -> Any:
        return iter_decoded(
            blobs,
            (WeightedBlob(i.digest, i.weight) for i in plan.items),
            spec=plan.spec,
            policy=plan.policy,
            decoded=decoded,
            **kwargs,
        )

    norms: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()
    rejected: int | None = None
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite sum is checked below
        delta: Mapping[str, np.ndarray]
        if plan.secure_sum is not None:
            delta = plan.secure_sum.mean_delta(plan.spec)
            total_weight = float(plan.secure_sum.count)
            what = "secure aggregation mean"
        elif dp is not None:
            try:
                sums, count = privacy.private_sum(
                    (u for u, _ in source()), plan.spec, clip_norm=dp.clip_norm
                )
            except ValueError as exc:  # a non-finite norm (decoders refuse NaN/Inf)
                raise AggregationFailed(f"differential privacy: {exc}") from None
            total_weight = float(count)
            delta = privacy.privatize_mean(
                sums,
                privacy=dp,
                cohort=cfg.dp_cohort,
                rng=secure_rng() if noise_rng is None else noise_rng,
            )
            what = "differentially private mean"
        else:
            combined = combine(
                source,
                count=len(plan.items),
                spec=plan.spec,
                method=cfg.robust,
                trim_fraction=cfg.trim_fraction,
                bound=plan.norm_bound,
                krum_byzantine=cfg.krum_byzantine,
                krum_select=cfg.krum_select,
            )
            total_weight = combined.total_weight
            delta = combined.delta
            norms, scales = tuple(combined.norms), tuple(combined.scales)
            rejected = combined.num_rejected
            what = "weighted mean" if cfg.robust == "mean" else f"combined ({cfg.robust})"
            del combined
    _check_finite(f"the {what} update is not finite", delta)
    aggregated = time.perf_counter()
    weights = load_weights(blobs, plan.base_digest, plan.spec)
    strategy = make_strategy(plan.config)
    new_weights, new_state = strategy.step(weights, delta, load_state(blobs, plan.state_digest))
    del delta, weights  # the dense float64 sum is spent; free it before encoding
    _check_finite(f"the new model (version {plan.new_version}) overflows float32", new_weights)
    _check_finite("the new server optimizer state is not finite", new_state)
    stepped = time.perf_counter()
    try:
        model_digest, model_size = store_weights(blobs, new_weights)
    except ValueError as exc:  # encode_model refuses what it cannot write
        raise AggregationFailed(
            f"the new model (version {plan.new_version}) cannot be encoded: {exc}"
        ) from None
    state_digest = store_state(blobs, new_state)
    broadcast = None if plan.policy.download.is_dense else _broadcast(plan, blobs, new_weights)
    stored = time.perf_counter()
    due = plan.new_version % cfg.eval_every == 0 or plan.new_version >= cfg.num_rounds
    server = run_hook(hook, plan.model_config, new_weights) if due else {}
    timings = {
        "aggregate": aggregated - start,
        "step": stepped - aggregated,
        "store": stored - stepped,
        "eval": time.perf_counter() - stored,
    }
    return Result(
        model_digest,
        model_size,
        state_digest,
        total_weight,
        server,
        broadcast,
        timings,
        norms=norms,
        scales=scales,
        next_norm_bound=bounds.adapt(cfg.norm_bound, plan.norm_bound, norms),
        num_rejected=rejected,
    )


def _broadcast(plan: Plan, blobs: BlobStore, new_weights: Weights) -> Broadcast:
    """Compress the step from the base version's broadcast model towards the new model
    (server-side error feedback: what is left out stays in ``new - broadcast`` and goes down
    with the next delta) and store the delta and the new broadcast model.

    The quantization's randomness is seeded by (task, version), so a retried aggregation
    writes the same blobs."""
    previous = load_weights(blobs, plan.base_broadcast_digest, plan.spec)
    try:
        data, rebuilt = make_delta(
            new_weights,
            previous,
            plan.policy.download,
            np.random.default_rng([plan.task_id, plan.new_version]),
            spec=plan.spec,
            task_id=plan.task_id,
            from_version=plan.base_version,
            to_version=plan.new_version,
        )
    except ValueError as exc:
        raise AggregationFailed(
            f"the broadcast delta to version {plan.new_version} cannot be made: {exc}"
        ) from None
    digest, size = store_weights(blobs, rebuilt)
    return Broadcast(digest, size, blobs.put(data), len(data))


def _check_finite(what: str, arrays: Mapping[str, np.ndarray]) -> None:
    """:class:`AggregationFailed` (``what``, and the first tensor of ``arrays`` holding a NaN
    or an infinite value); one vectorized pass per tensor."""
    for name, a in arrays.items():
        bad = a.size - int(np.count_nonzero(np.isfinite(a)))
        if bad:
            raise AggregationFailed(f"{what}: tensor {name!r} has {bad} NaN or infinite value(s)")


def _count_clipped(session: Session, plan: Plan, result: Result) -> None:
    """Add the updates the bound scaled down to their devices' ``num_norm_clipped``."""
    per_device: dict[str, int] = {}
    for item, scale in zip(plan.items, result.scales, strict=False):
        if scale < 1.0:
            per_device[item.device_id] = per_device.get(item.device_id, 0) + 1
    if not per_device:
        return
    session.connection().execute(
        update(Device)
        .where(Device.id == bindparam("p_device"))
        .values(num_norm_clipped=func.coalesce(Device.num_norm_clipped, 0) + bindparam("p_count")),
        [{"p_device": d, "p_count": n} for d, n in sorted(per_device.items())],
    )


def target_reached(cfg: AggregationConfig, server_metrics: dict[str, float]) -> bool:
    """True when the configured server-side metric reached its target (losses: at or below
    the target; anything else: at or above)."""
    if cfg.target_name is None or cfg.target_value is None:
        return False
    name = cfg.target_name.removeprefix("server_")
    value = server_metrics.get(name)
    if value is None:
        return False
    if "loss" in name:
        return value <= cfg.target_value
    return value >= cfg.target_value


def commit_aggregation(
    session: Session, plan: Plan, result: Result, *, now: datetime, liveness: Liveness
) -> list[str] | None:
    """Step 3. Returns the devices to wake, or ``None`` when the state moved meanwhile (the
    work is discarded; nothing was changed)."""
    task = session.scalar(
        select(Task).where(Task.id == plan.task_id).with_for_update(key_share=True)
    )
    if task is None or task.current_version != plan.base_version:
        return None
    if task.status not in TASK_LIVE:
        return None
    rnd = session.get(Round, plan.round_id)
    if rnd is None or rnd.status not in ROUND_ACTIVE:
        return None
    ids = [i.update_id for i in plan.items]
    locked = 0
    for start in range(0, len(ids), IN_BATCH):
        locked += len(
            session.scalars(
                select(Update.id)
                .where(
                    Update.id.in_(ids[start : start + IN_BATCH]),
                    Update.status == UpdateStatus.ACCEPTED,
                )
                .with_for_update(key_share=True)
            ).all()
        )
    if locked != len(ids):
        return None
    new_version = plan.new_version
    measured = len(result.norms) == len(plan.items)
    # One executemany by primary key instead of loading and tracking every row.
    session.execute(
        update(Update),
        [
            {
                "id": i.update_id,
                "status": UpdateStatus.APPLIED,
                "applied_version": new_version,
                "weight": i.weight,
                "norm": result.norms[k] if measured else None,
                "clip_scale": result.scales[k] if measured else None,
            }
            for k, i in enumerate(plan.items)
        ],
    )
    _count_clipped(session, plan, result)
    session.flush()
    server = {f"server_{k}": v for k, v in result.server_metrics.items()}
    metrics = {**reports.version_client_metrics(session, task.id, new_version), **server}
    if plan.norm_bound is not None:
        metrics["norm_bound"] = plan.norm_bound
        metrics["num_clipped"] = float(result.num_clipped)
    if plan.secure_sum is not None:
        metrics["secagg_included"] = float(plan.secure_sum.count)
    if result.num_rejected is not None and plan.config.robust == "multi_krum":
        metrics["num_rejected"] = float(result.num_rejected)
    session.add(
        ModelVersion(
            task_id=task.id,
            version=new_version,
            blob_digest=result.model_digest,
            size_bytes=result.model_size,
            broadcast_digest=None if result.broadcast is None else result.broadcast.digest,
            broadcast_size=None if result.broadcast is None else result.broadcast.size,
            delta_digest=None if result.broadcast is None else result.broadcast.delta_digest,
            delta_size=None if result.broadcast is None else result.broadcast.delta_size,
            round_id=rnd.id,
            num_updates=plan.num_updates,
            metrics=metrics,
            created_at=now,
        )
    )
    # Under the task row lock nobody else moves the round; the compare-and-set still makes
    # sure a round gets exactly one outcome, whatever a future caller forgets to lock.
    closed = rounds.set_round_status(
        session,
        rnd,
        expected=ROUND_ACTIVE,
        to=RoundStatus.CLOSED,
        closed_at=now,
        result_version=new_version,
        num_received=plan.num_updates,
        num_stale=sum(1 for i in plan.items if i.tau > 0),
        num_clipped=result.num_clipped,
        metrics=metrics,
    )
    if not closed:
        raise RoundMoved(f"round {rnd.id} left {tuple(map(str, ROUND_ACTIVE))} during its commit")
    emit(
        session,
        "round.closed",
        task=task.id,
        round=rnd.id,
        number=rnd.number,
        version=new_version,
        updates=plan.num_updates,
    )
    emit(
        session,
        "version.committed",
        task=task.id,
        round=rnd.id,
        version=new_version,
        updates=plan.num_updates,
        size_bytes=result.model_size,
        metrics=metrics,
    )
    task.current_version = new_version
    task.optimizer_state_digest = result.state_digest
    if result.next_norm_bound is not None:
        task.norm_bound = result.next_norm_bound
    task.updated_at = now
    dp = plan.config.central_dp
    if dp is not None:
        # The released version is paid for in the same transaction that releases it.
        task.privacy = privacy.charge(
            task.privacy, round_id=rnd.id, noise_multiplier=dp.noise_multiplier, delta=dp.delta
        )
    session.flush()

    cfg = plan.config
    if new_version >= cfg.num_rounds:
        return rounds.finish_task(
            session, task, now=now, reason=f"{cfg.num_rounds} aggregations done"
        )
    if target_reached(cfg, result.server_metrics):
        return rounds.finish_task(
            session,
            task,
            now=now,
            reason=f"{cfg.target_name} reached {cfg.target_value} at version {new_version}",
        )
    if task.status != TaskStatus.RUNNING:
        return []
    if cfg.mode == "async":
        rounds.open_async_round(session, task, cfg, now=now)
        return []
    _, assigned = rounds.open_sync_round(session, task, cfg, now=now, liveness=liveness)
    return assigned
