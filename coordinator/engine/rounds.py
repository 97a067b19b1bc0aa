"""The round state machine: opening, closing and failing rounds, ending assignments, ending
tasks. Every function works inside the caller's transaction (it flushes, never commits) and
returns the ids of devices whose long-polls should wake once the transaction has committed.

Sync round: ``open`` (collecting) -> ``aggregating`` (closed to new work, quorum met) ->
``closed`` (new version committed, see :mod:`fedge.coordinator.engine.apply`), or ``open`` ->
``failed`` (deadline passed below quorum). Async round: ``open`` -> ``closed`` when
``buffer_size`` updates are applied. docs/rounds.md describes the rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from fedge.coordinator.db import in_states
from fedge.coordinator.engine import privacy, secure
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness, Requirements
from fedge.coordinator.engine.rotation import choose_paced, comes_within, expected_checkin
from fedge.coordinator.engine.selection import (
    Candidate,
    busy_clause,
    choose,
    declined_devices,
    eligible_devices,
)
from fedge.coordinator.events import emit
from fedge.coordinator.models import Assignment, Device, Round, Task, Update
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ASSIGNMENT_ENDED,
    ROUND_ACTIVE,
    AssignmentStatus,
    DeviceStatus,
    RoundStatus,
    TaskStatus,
    UpdateStatus,
)
from fedge.shared.dp import secure_rng

#: Ids per ``IN (...)`` list (SQLite allows at most 32,766 bound parameters per statement).
CHUNK = 10_000


def active_round(session: Session, task_id: int) -> Round | None:
    """The task's open or aggregating round (there is at most one)."""
    return session.scalar(
        select(Round)
        .where(Round.task_id == task_id, in_states(Round.status, ROUND_ACTIVE))
        .order_by(Round.number.desc())
        .limit(1)
    )


def next_round_number(session: Session, task_id: int) -> int:
    last = session.scalar(select(func.max(Round.number)).where(Round.task_id == task_id))
    return 1 if last is None else int(last) + 1


def count_pending(
    session: Session, task_id: int, *, base_version: int | None = None, round_id: int | None = None
) -> int:
    """Accepted, not yet applied updates of a task (optionally only on ``base_version``, or
    only of the round ``round_id``)."""
    stmt = select(func.count(Update.id)).where(
        Update.task_id == task_id, Update.status == UpdateStatus.ACCEPTED
    )
    if base_version is not None:
        stmt = stmt.where(Update.base_version == base_version)
    if round_id is not None:
        stmt = stmt.where(Update.round_id == round_id)
    return int(session.scalar(stmt) or 0)


def lock_devices(session: Session, device_ids: list[str]) -> None:
    """Row-lock devices in id order (``FOR NO KEY UPDATE``; nothing on SQLite)."""
    for start in range(0, len(device_ids), CHUNK):
        session.execute(
            select(Device.id)
            .where(Device.id.in_(device_ids[start : start + CHUNK]))
            .order_by(Device.id)
            .with_for_update(key_share=True)
        ).all()


def _lock_idle_devices(session: Session, device_ids: list[str]) -> list[str]:
    """Row-lock the chosen devices (in id order) and keep those still idle.

    Every row lock the engine takes is ``FOR NO KEY UPDATE`` (``key_share=True``): it
    serializes the engine's own writers but not the ``FOR KEY SHARE`` locks PostgreSQL takes
    on referenced rows when an upload inserts an ``updates`` row, which would otherwise
    deadlock an aggregation against a concurrent upload.

    On PostgreSQL two processes (or a round opening and an async work request) could pick the
    same device at once; the lock plus the re-check of busyness after it settles it. The lock
    waits rather than skipping, since device rows are also locked briefly by every signed
    request (``last_seen_at``). SQLite serializes writers, so there the re-check simply passes.
    """
    if not device_ids:
        return []
    lock_devices(session, sorted(device_ids))
    still_idle = set(
        session.scalars(select(Device.id).where(Device.id.in_(device_ids), ~busy_clause()))
    )
    return [d for d in device_ids if d in still_idle]


def _assign(
    session: Session, task: Task, rnd: Round, device_ids: Iterable[str], *, lease_until: datetime
) -> list[str]:
    ids = list(device_ids)
    for device_id in ids:
        session.add(
            Assignment(
                task_id=task.id,
                round_id=rnd.id,
                device_id=device_id,
                base_version=rnd.base_version,
                status=AssignmentStatus.ASSIGNED,
                lease_expires_at=lease_until,
            )
        )
    if ids:
        session.execute(
            update(Device)
            .where(Device.id.in_(ids))
            .values(num_assigned=Device.num_assigned + 1)
            .execution_options(synchronize_session=False)
        )
    bump_round(session, rnd.id, num_assigned=len(ids))
    session.flush()
    return ids


#: The start of a running task's ``status_reason`` while it waits for devices.
WAITING = "waiting for eligible devices"


def set_waiting(task: Task, reason: str | None, *, now: datetime) -> None:
    """Say (or stop saying) in a running task's ``status_reason`` why no work goes out; the
    row is written only when the reason changes."""
    if task.status_reason != reason:
        task.status_reason = reason
        task.updated_at = now


def _declined_devices(session: Session, task_id: int) -> int:
    """Active devices left out of the task because they declined it (since their report)."""
    return int(
        session.scalar(
            select(func.count(Device.id)).where(
                Device.status == DeviceStatus.ACTIVE, Device.id.in_(declined_devices(task_id))
            )
        )
        or 0
    )


def waiting_reason(session: Session, task: Task, available: int, needed: int) -> str:
    requirements = Requirements.from_stored(task.requirements)
    declined = _declined_devices(session, task.id)
    tail = f"; {declined} declined this task" if declined else ""
    return (
        f"{WAITING}: {available} of the {needed} needed are live, idle and meet the "
        f"requirements ({requirements.describe()}){tail}"
    )


def apply_pending_training(task: Task, *, now: datetime) -> None:
    """Move training settings changed on the live task (``PATCH /tasks/{id}``) into force,
    as its next round opens: every device of one round trains with the same settings."""
    if task.pending_training is None:
        return
    task.training = {**task.training, **task.pending_training}
    task.pending_training = None
    task.updated_at = now


def _eligible(
    session: Session,
    task: Task,
    *,
    now: datetime,
    liveness: Liveness,
    not_in_round: int | None = None,
    by_name: bool = False,
) -> list[Candidate]:
    """The devices that may work on ``task`` now (its requirements, liveness, no decline)."""
    return eligible_devices(
        session,
        now=now,
        liveness=liveness,
        requirements=Requirements.from_stored(task.requirements),
        task_id=task.id,
        not_in_round=not_in_round,
        by_name=by_name,
    )


def selection_rng(task: Task, cfg: AggregationConfig, *keys: int) -> np.random.Generator:
    """The generator of a sync round's pick: seeded by ``(selection_seed, *keys)`` when the
    task sets one (the same cohorts in every run of an experiment), else by
    ``(task id, *keys)``."""
    first = task.id if cfg.selection_seed is None else cfg.selection_seed
    return np.random.default_rng([first, *keys])


def open_sync_round(
    session: Session, task: Task, cfg: AggregationConfig, *, now: datetime, liveness: Liveness
) -> tuple[Round | None, list[str]]:
    """Select devices and open the next sync round on the current version.

    Opens nothing while fewer devices are eligible than the round could need to reach its
    quorum (counting fresh updates already waiting); the task's ``status_reason`` says so and
    the scheduler tries again next tick. The selection rng is seeded by (task, round number),
    so a round's pick is reproducible; by (``selection_seed``, round number) over the eligible
    devices in name order when the task sets that seed (the same pick on another coordinator
    with the same fleet). Central differential privacy instead picks uniformly
    with a CSPRNG-seeded generator, notes the round's sampling rate in the task's privacy
    ledger, and finishes the task instead when the round would spend more than
    ``target_epsilon`` (docs/privacy.md).
    """
    dp = cfg.central_dp
    # Central DP aggregates only the round's own sample, secure aggregation only the round's
    # own masked sum: earlier updates do not count.
    own_only = dp is not None or cfg.secure is not None
    fresh = 0 if own_only else count_pending(session, task.id, base_version=task.current_version)
    seeded = cfg.selection_seed is not None
    candidates = _eligible(session, task, now=now, liveness=liveness, by_name=seeded)
    needed = max(2 if cfg.secure else 1, cfg.min_updates - fresh)
    if len(candidates) < needed:
        set_waiting(task, waiting_reason(session, task, len(candidates), needed), now=now)
        return None, []
    sampling_rate = None
    if dp is not None:
        sampling_rate = privacy.rounded_rate(cfg.num_selected, len(candidates))
        refusal = privacy.budget_refusal(dp, task.privacy, q=sampling_rate)
        if refusal is not None:
            return None, finish_task(session, task, now=now, reason=refusal)
    number = next_round_number(session, task.id)
    # A DP sample must stay secret (amplification by sampling assumes it): drawn from the
    # OS's CSPRNG instead of the reproducible (task, round) seed.
    rng = secure_rng() if dp is not None else selection_rng(task, cfg, number)
    if liveness.paced_period_s is not None and dp is None:  # a paced fleet: fair rotation
        picked = choose_paced(
            candidates,
            cfg.num_selected,
            rng,
            now=now,
            period=liveness.paced_period_s,
            window=liveness.paced_window_s or 0.0,
        )
    else:
        picked = choose(candidates, cfg.num_selected, rng, uniform=dp is not None)
    chosen = _lock_idle_devices(session, picked)
    if len(chosen) < needed:
        return None, []
    set_waiting(task, None, now=now)
    apply_pending_training(task, now=now)
    deadline = now + timedelta(seconds=cfg.round_deadline_s)
    rnd = Round(
        task_id=task.id,
        number=number,
        base_version=task.current_version,
        status=RoundStatus.OPEN,
        target_updates=cfg.clients_per_round,
        opened_at=now,
        deadline_at=deadline,
        num_received=fresh,
    )
    session.add(rnd)
    session.flush()
    if sampling_rate is not None:
        task.privacy = privacy.with_open_round(task.privacy, round_id=rnd.id, q=sampling_rate)
    assigned = _assign(session, task, rnd, chosen, lease_until=deadline)
    if cfg.secure is not None:
        secure.open_phases(session, task, rnd, cfg.secure, cfg, now=now)
    emit(
        session,
        "round.opened",
        task=task.id,
        round=rnd.id,
        number=number,
        mode="sync",
        base_version=rnd.base_version,
        assigned=len(assigned),
        deadline=deadline.isoformat(),
    )
    return rnd, assigned


def _outside_round(
    session: Session,
    task: Task,
    rnd: Round,
    cfg: AggregationConfig,
    *,
    now: datetime,
    liveness: Liveness,
) -> list[Candidate]:
    """The eligible devices that are not and were not in ``rnd``: who may take a place freed
    in an open round (in name order under ``selection_seed``)."""
    return _eligible(
        session,
        task,
        now=now,
        liveness=liveness,
        not_in_round=rnd.id,
        by_name=cfg.selection_seed is not None,
    )


def settle_declines(
    session: Session,
    task: Task,
    rnd: Round,
    cfg: AggregationConfig,
    *,
    now: datetime,
    liveness: Liveness,
) -> list[str]:
    """An open sync round some of whose devices declined: replace them, and never wait for
    a deadline that can change nothing (docs/rounds.md, "Declines").

    Each decline frees a place: as many eligible devices as there are declined places not
    yet refilled (at most ``num_selected`` at work or done) are assigned, never one that is
    or was in the round. When nobody is left working on the round, it closes at once: to
    ``aggregating`` when its fresh updates reach ``min_updates``, else ``failed``. While the
    devices at work cannot reach the quorum and no replacement exists, the task's
    ``status_reason`` says so."""
    if rnd.num_declined == 0 or rnd.status != RoundStatus.OPEN:
        return []
    counts = dict(
        session.execute(
            select(Assignment.status, func.count(Assignment.id))
            .where(Assignment.round_id == rnd.id)
            .group_by(Assignment.status)
        ).all()
    )
    active = sum(int(counts.get(s, 0)) for s in ASSIGNMENT_ACTIVE)
    placed = active + int(counts.get(AssignmentStatus.UPLOADED, 0))
    declined = int(
        session.scalar(
            select(func.count(Assignment.id)).where(
                Assignment.round_id == rnd.id, Assignment.decline_reason.is_not(None)
            )
        )
        or 0
    )
    wanted = min(cfg.num_selected - placed, declined)
    woken: list[str] = []
    if wanted > 0:
        candidates = _outside_round(session, task, rnd, cfg, now=now, liveness=liveness)
        rng = selection_rng(task, cfg, rnd.number, declined)
        chosen = _lock_idle_devices(session, choose(candidates, wanted, rng))
        if chosen and rnd.deadline_at is not None:
            woken = _assign(session, task, rnd, chosen, lease_until=rnd.deadline_at)
            active += len(woken)
    fresh = count_pending(session, task.id, base_version=rnd.base_version)
    if active > 0:
        if fresh + active < cfg.min_updates:
            set_waiting(
                task,
                f"{WAITING}: round {rnd.number} has {fresh} update(s) and {active} device(s) "
                f"at work, fewer than the {cfg.min_updates} needed; {declined} declined and "
                "no eligible device is left to replace them",
                now=now,
            )
        return woken
    if fresh >= cfg.min_updates:
        if set_round_status(session, rnd, expected=(RoundStatus.OPEN,), to=RoundStatus.AGGREGATING):
            rnd.num_received = fresh
        return woken
    reason = (
        f"every selected device declined or left ({declined} declined) and no other "
        f"eligible device is available; {fresh} of the {cfg.min_updates} updates needed"
    )
    fail_round(session, rnd, reason=reason, now=now, expected=(RoundStatus.OPEN,))
    set_waiting(task, f"{WAITING}: round {rnd.number} failed: {reason}", now=now)
    return woken


#: Seconds a device picked for a paced round may come after its expected check-in before the
#: round takes another device in its place: devices sleep whole seconds, and a loaded network
#: or coordinator (TLS handshakes, the check-ins' group commit) delays them a few more.
MISSED_GRACE_S = 10.0


def replace_missed(
    session: Session,
    task: Task,
    rnd: Round,
    cfg: AggregationConfig,
    *,
    now: datetime,
    liveness: Liveness,
) -> list[str]:
    """An open sync round of a paced fleet replaces the picked devices that did not come
    (docs/rounds.md, "Paced fleets"): an assignment still ``assigned`` whose device was not
    seen since the round opened, and whose expected check-in
    (:func:`~fedge.coordinator.engine.rotation.expected_checkin` from the round's opening)
    passed more than :data:`MISSED_GRACE_S` ago. Such a device learns of its assignment only
    when it checks in, and it may be sleeping a random part of its period after a check-in
    that failed while the coordinator was down, or be offline: the round would wait for it
    until its deadline. As many eligible devices not yet in the round as come within the
    selection window from now (:func:`~fedge.coordinator.engine.rotation.choose_paced`) take
    the places of the longest overdue; those assignments are cancelled (not drops: the device
    never learnt of them). A device that comes later finds no work and is told its next slot.

    Nothing is replaced once less than a window is left before the deadline, under central
    differential privacy (its sample is drawn once, at the sampling rate it is charged) or
    secure aggregation (its cohort is fixed when the round opens). Everything is read from
    the database, so a restarted coordinator finds the devices its outage made miss their
    slots, whether or not it noticed the outage."""
    period = liveness.paced_period_s
    window = liveness.paced_window_s or 0.0
    if period is None or cfg.central_dp is not None or cfg.secure is not None:
        return []
    if rnd.status != RoundStatus.OPEN or rnd.deadline_at is None:
        return []
    if now + timedelta(seconds=window) > rnd.deadline_at:
        return []
    opened = rnd.opened_at.timestamp()
    at = now.timestamp()
    rows = session.execute(
        select(Assignment, Device.last_seen_at)
        .join(Device, Device.id == Assignment.device_id)
        .where(
            Assignment.round_id == rnd.id,
            Assignment.status == AssignmentStatus.ASSIGNED,
            or_(Device.last_seen_at.is_(None), Device.last_seen_at < rnd.opened_at),
        )
        .order_by(Assignment.id)
    ).all()
    missed: list[tuple[float, Assignment]] = []
    for assignment, seen in rows:
        last = None if seen is None else seen.timestamp()
        expected = expected_checkin(assignment.device_id, last, opened, period)
        if at > expected + MISSED_GRACE_S:
            missed.append((expected, assignment))
    if not missed:
        return []
    candidates = _outside_round(session, task, rnd, cfg, now=now, liveness=liveness)
    rng = selection_rng(task, cfg, rnd.number, rnd.num_assigned, len(missed))
    picked = choose_paced(candidates, len(missed), rng, now=now, period=period, window=window)
    seen_at = {c.device_id: c.last_seen for c in candidates}
    soon = [
        d
        for d in picked
        if (seen := seen_at[d]) is not None
        and comes_within(d, seen.timestamp(), at, period, window)
    ]
    if not soon:
        return []
    # Every device row this may write, locked at once in id order (the engine's lock order;
    # a check-in batch holding one of the missed and waiting for a newcomer cannot deadlock).
    lock_devices(session, sorted({*soon, *(a.device_id for _, a in missed)}))
    chosen = _lock_idle_devices(session, soon)
    if not chosen:
        return []
    missed.sort(key=lambda pair: (pair[0], pair[1].id))
    gone = [assignment for _, assignment in missed[: len(chosen)]]
    woken = end_assignments(session, gone, status=AssignmentStatus.CANCELLED, now=now)
    # Only as many newcomers as places really freed (an upload may have ended one meanwhile).
    chosen = chosen[: len(woken)]
    woken += _assign(session, task, rnd, chosen, lease_until=rnd.deadline_at)
    if chosen:
        emit(
            session,
            "round.refilled",
            task=task.id,
            round=rnd.id,
            number=rnd.number,
            replaced=len(chosen),
            reason="picked devices did not check in when expected",
        )
    return woken


def explain_async_wait(session: Session, task: Task, *, now: datetime, liveness: Liveness) -> None:
    """An async task with nobody at work says in its ``status_reason`` when no live device
    meets its requirements (and stops saying it once one does)."""
    working = session.scalar(
        select(Assignment.id)
        .where(Assignment.task_id == task.id, in_states(Assignment.status, ASSIGNMENT_ACTIVE))
        .limit(1)
    )
    if working is not None:
        set_waiting(task, None, now=now)
        return
    candidates = _eligible(session, task, now=now, liveness=liveness)
    set_waiting(task, None if candidates else waiting_reason(session, task, 0, 1), now=now)


def open_async_round(
    session: Session, task: Task, cfg: AggregationConfig, *, now: datetime
) -> Round:
    """Open the next async round on the current version; work is handed out on demand."""
    apply_pending_training(task, now=now)
    rnd = Round(
        task_id=task.id,
        number=next_round_number(session, task.id),
        base_version=task.current_version,
        status=RoundStatus.OPEN,
        target_updates=cfg.buffer_size,
        opened_at=now,
        num_received=count_pending(session, task.id),
    )
    session.add(rnd)
    session.flush()
    emit(
        session,
        "round.opened",
        task=task.id,
        round=rnd.id,
        number=rnd.number,
        mode="async",
        base_version=rnd.base_version,
    )
    return rnd


def end_assignments(
    session: Session, assignments: Iterable[Assignment], *, status: AssignmentStatus, now: datetime
) -> list[str]:
    """Move active assignments to ``cancelled`` or ``dropped``; a drop counts against the
    device's reliability and the assignment's round. Returns the devices to wake.

    The change is one conditional ``UPDATE .. WHERE status IN ('assigned', 'downloaded')``:
    an assignment whose upload committed meanwhile (or that another writer ended) keeps its
    newer state, and only the rows this statement really moved are counted. On PostgreSQL a
    row that a concurrent upload holds locked is waited for and then re-checked against the
    condition, so the upload and the scheduler cannot both win.
    """
    assert status in ASSIGNMENT_ENDED
    chosen = list(assignments)
    ids = sorted({a.id for a in chosen})
    # Devices before assignments: the lock order of uploads and revocations too.
    lock_devices(session, sorted({a.device_id for a in chosen}))
    moved: list[tuple[int, str, int, int]] = []
    for start in range(0, len(ids), CHUNK):
        moved += [
            (row.id, row.device_id, row.round_id, row.task_id)
            for row in session.execute(
                update(Assignment)
                .where(
                    Assignment.id.in_(ids[start : start + CHUNK]),
                    in_states(Assignment.status, ASSIGNMENT_ACTIVE),
                )
                .values(status=status, finished_at=now)
                .returning(
                    Assignment.id, Assignment.device_id, Assignment.round_id, Assignment.task_id
                )
                .execution_options(synchronize_session=False)
            )
        ]
    _expire_status(session, Assignment, [m[0] for m in moved])
    woken = [m[1] for m in moved]
    for assignment_id, device_id, round_id, task_id in (
        moved if status == AssignmentStatus.DROPPED else ()
    ):
        emit(
            session,
            "assignment.dropped",
            task=task_id,
            round=round_id,
            device=device_id,
            assignment=assignment_id,
            reason="the device delivered no update in time",
        )
    if status == AssignmentStatus.DROPPED:
        for device_id in sorted(woken):
            session.execute(
                update(Device)
                .where(Device.id == device_id)
                .values(num_dropped=Device.num_dropped + 1)
                .execution_options(synchronize_session=False)
            )
        per_round: dict[int, int] = {}
        for _, _, round_id, _ in moved:
            per_round[round_id] = per_round.get(round_id, 0) + 1
        for round_id, n in sorted(per_round.items()):
            bump_round(session, round_id, num_dropped=n)
    session.flush()
    return woken


def bump_round(session: Session, round_id: int, **deltas: int) -> None:
    """Add to a round's counters in SQL (``num_x = num_x + n``), never from a value read
    earlier, so concurrent writers cannot lose each other's counts."""
    values = {name: getattr(Round, name) + n for name, n in deltas.items() if n}
    if values:
        session.execute(
            update(Round)
            .where(Round.id == round_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        _expire_attrs(session, Round, [round_id], list(values))


def set_round_status(
    session: Session,
    rnd: Round,
    *,
    expected: Iterable[RoundStatus],
    to: RoundStatus,
    **values: Any,
) -> bool:
    """Compare-and-set a round's status: ``expected`` -> ``to`` (plus ``values``) in one
    conditional ``UPDATE``. False, and nothing changed, when the round is no longer in an
    expected state (another writer moved it first); the loaded ``rnd`` is refreshed to what
    the statement wrote."""
    session.flush()
    result = session.execute(
        update(Round)
        .where(Round.id == rnd.id, Round.status.in_(tuple(expected)))
        .values(status=to, **values)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.refresh(rnd)
        return False
    for name, value in {"status": to, **values}.items():
        set_committed_value(rnd, name, value)
    return True


def _expire_status(session: Session, model: type[Any], ids: list[int]) -> None:
    _expire_attrs(session, model, ids, ["status", "finished_at"])


def _expire_attrs(session: Session, model: type[Any], ids: list[int], attrs: list[str]) -> None:
    """Loaded objects written by a Core statement re-read those attributes on next access."""
    for obj_id in ids:
        obj = session.identity_map.get(identity_key(model, obj_id))
        if obj is not None:
            session.expire(obj, attrs)


def active_assignments(
    session: Session, *, task_id: int, round_id: int | None = None
) -> list[Assignment]:
    stmt = select(Assignment).where(
        Assignment.task_id == task_id, in_states(Assignment.status, ASSIGNMENT_ACTIVE)
    )
    if round_id is not None:
        stmt = stmt.where(Assignment.round_id == round_id)
    return list(session.scalars(stmt.order_by(Assignment.id)))


def close_sync_round_if_due(
    session: Session, task: Task, rnd: Round, cfg: AggregationConfig, *, now: datetime
) -> list[str]:
    """Close an open sync round on its target or at its deadline.

    Target reached (``clients_per_round`` fresh updates) -> ``aggregating``; the devices still
    working are cancelled (not their fault: not counted as drops). Deadline with quorum ->
    ``aggregating``; devices that did not upload are dropped. Deadline below quorum ->
    ``failed``, devices dropped; the fresh updates stay accepted and join the next aggregation
    (they are on the same version). Under central differential privacy only the round's own
    uploads count: the others are not in its sample and will not be aggregated.
    """
    own = rnd.id if cfg.central_dp is not None else None
    fresh = count_pending(session, task.id, base_version=rnd.base_version, round_id=own)
    if rnd.num_received != fresh:
        rnd.num_received = fresh
    reached = fresh >= cfg.clients_per_round
    expired = rnd.deadline_at is not None and now >= rnd.deadline_at
    if not (reached or expired):
        return []
    if reached:
        if not set_round_status(
            session, rnd, expected=(RoundStatus.OPEN,), to=RoundStatus.AGGREGATING
        ):
            return []
        _collected(session, rnd, fresh, "target reached")
        working = active_assignments(session, task_id=task.id, round_id=rnd.id)
        return end_assignments(session, working, status=AssignmentStatus.CANCELLED, now=now)
    if fresh >= cfg.min_updates:
        if not set_round_status(
            session, rnd, expected=(RoundStatus.OPEN,), to=RoundStatus.AGGREGATING
        ):
            return []
        _collected(session, rnd, fresh, "deadline passed with quorum")
    elif not fail_round(
        session,
        rnd,
        reason=f"deadline passed with {fresh} of the {cfg.min_updates} updates needed",
        now=now,
        expected=(RoundStatus.OPEN,),
    ):
        return []
    working = active_assignments(session, task_id=task.id, round_id=rnd.id)
    return end_assignments(session, working, status=AssignmentStatus.DROPPED, now=now)


def _collected(session: Session, rnd: Round, updates: int, reason: str) -> None:
    emit(
        session,
        "round.aggregating",
        task=rnd.task_id,
        round=rnd.id,
        number=rnd.number,
        updates=updates,
        reason=reason,
    )


def fail_round(
    session: Session,
    rnd: Round,
    *,
    reason: str,
    now: datetime,
    expected: Iterable[RoundStatus] = ROUND_ACTIVE,
) -> bool:
    """``expected`` -> ``failed`` with the reason; False (nothing changed) when another
    writer already gave the round its outcome."""
    failed = set_round_status(
        session, rnd, expected=expected, to=RoundStatus.FAILED, closed_at=now, status_reason=reason
    )
    if failed:
        emit(
            session,
            "round.failed",
            task=rnd.task_id,
            round=rnd.id,
            number=rnd.number,
            received=rnd.num_received,
            reason=reason,
        )
    return failed


def expire_async_leases(session: Session, task: Task, *, now: datetime) -> list[str]:
    """Drop async assignments whose lease ran out (frees their concurrency slot)."""
    expired = session.scalars(
        select(Assignment).where(
            Assignment.task_id == task.id,
            in_states(Assignment.status, ASSIGNMENT_ACTIVE),
            Assignment.lease_expires_at.is_not(None),
            Assignment.lease_expires_at < now,
        )
    ).all()
    return end_assignments(session, expired, status=AssignmentStatus.DROPPED, now=now)


def cancel_doomed(
    session: Session, task: Task, cfg: AggregationConfig, *, now: datetime
) -> list[str]:
    """Cancel active assignments trained on a version already more than ``max_staleness``
    behind the current one: their upload could only be refused as stale, so their devices
    stop now and take new work (async tasks; a sync round's work is ended when it closes)."""
    oldest_usable = task.current_version - cfg.max_staleness
    doomed = session.scalars(
        select(Assignment).where(
            Assignment.task_id == task.id,
            in_states(Assignment.status, ASSIGNMENT_ACTIVE),
            Assignment.base_version < oldest_usable,
        )
    ).all()
    return end_assignments(session, doomed, status=AssignmentStatus.CANCELLED, now=now)


def reject_pending(session: Session, task_id: int, *, reason: str) -> int:
    """Mark every accepted, unapplied update of a task rejected (the task ended)."""
    result = session.execute(
        update(Update)
        .where(Update.task_id == task_id, Update.status == UpdateStatus.ACCEPTED)
        .values(status=UpdateStatus.REJECTED, reason=reason)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def finish_task(session: Session, task: Task, *, now: datetime, reason: str) -> list[str]:
    """Complete a task: no more rounds, working devices cancelled, leftovers rejected."""
    task.status = TaskStatus.COMPLETED
    task.finished_at = now
    task.updated_at = now
    task.status_reason = reason
    emit(session, "task.finished", task=task.id, status=str(task.status), reason=reason)
    return wind_down(session, task, now=now, reason=f"task completed: {reason}")


def wind_down(session: Session, task: Task, *, now: datetime, reason: str) -> list[str]:
    """Effects of a task that stopped running for good (completed, cancelled, failed): its
    active round fails, its working devices are cancelled, waiting updates are rejected."""
    rnd = active_round(session, task.id)
    if rnd is not None:
        fail_round(session, rnd, reason=reason, now=now)
    woken = end_assignments(
        session,
        active_assignments(session, task_id=task.id),
        status=AssignmentStatus.CANCELLED,
        now=now,
    )
    reject_pending(session, task.id, reason=reason)
    session.flush()
    return woken


def pause_effects(session: Session, task: Task, *, now: datetime) -> list[str]:
    """A paused task keeps its open round but no device works on it."""
    return end_assignments(
        session,
        active_assignments(session, task_id=task.id),
        status=AssignmentStatus.CANCELLED,
        now=now,
    )
