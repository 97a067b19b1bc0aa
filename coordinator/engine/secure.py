"""Secure aggregation in the sync round engine: the four phases of a round, durable.

A sync task with ``aggregation.secure`` runs every round through the protocol of
:mod:`fedge.shared.secagg` (docs/secure-aggregation.md, "Engine integration"):

1. ``advert``: the selected devices (the round's cohort, numbered by device id) train, then
   post their signed key advertisement;
2. ``shares``: each advertised device fetches its neighbours' advertisements and posts its
   sealed share bundles;
3. ``masked``: each device that shared fetches the bundles addressed to it and posts its
   masked, quantized update;
4. ``unmask``: each device that uploaded fetches the fixed lists of its neighbours that
   uploaded and that did not, and posts the shares that remove the masks.

A phase closes when every device still in the round has posted its message, or at the
phase's deadline (a fraction of ``round_deadline_s``, :data:`PHASE_SHARE`). Closing checks the
phase's quorum (:func:`_close`); below it the round fails (``status_reason`` names the phase
and ``below_threshold``) and the next round starts with a new seed and new keys. Devices that
missed a phase are dropped (their assignments end ``dropped``) and are absent from the next
phase. What a phase decides (who is in, the relayed bundles, the unmask lists) is written in
the same transaction that opens the next phase, before any device can read it; a restarted
coordinator resumes in the same phase with the same lists, which are never recomputed.

After unmasking, the exact integer sum is stored on the round and the round moves to
``aggregating``; :mod:`fedge.coordinator.engine.apply` takes the mean over the survivors and
runs the server step as for plain uploads.

Every function works inside the caller's transaction (flushes, never commits) and returns the
devices whose long-polls should wake.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.config import AggregationConfig, SecureAggregationConfig
from fedge.coordinator.models import Assignment, Device, Round, SecAggMember, SecAggRound, Task
from fedge.coordinator.states import ASSIGNMENT_ACTIVE, AssignmentStatus, RoundStatus
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.secagg import Grid, RoundConfig, SecAggError, plan_degree, protocol
from fedge.shared.secagg.messages import (
    Advert,
    Kind,
    decode_advert,
    decode_shares,
    encode_shares,
)
from fedge.shared.secagg.support import unflatten
from fedge.shared.signing import public_key_from_b64
from fedge.shared.wireerror import WireFormatError

__all__ = [
    "PHASES",
    "PHASE_SHARE",
    "SecureSum",
    "advance",
    "open_phases",
    "round_config",
    "secure_sum",
]

#: The phases in order; a round then ends ``done`` (unmasked) or ``failed``.
PHASES = ("advert", "shares", "masked", "unmask")
#: Each phase's deadline as a share of ``round_deadline_s``, counted from the moment the
#: phase opens. The first includes the devices' training.
PHASE_SHARE = {"advert": 0.4, "shares": 0.2, "masked": 0.2, "unmask": 0.2}
DONE = "done"
FAILED = "failed"
#: What a member posts in each phase (the column of :class:`SecAggMember`).
POSTED = {
    "advert": "advert",
    "shares": "shares_out",
    "masked": "masked",
    "unmask": "unmask_response",
}


def round_config(row: SecAggRound, *, number: int) -> RoundConfig:
    """The protocol's public parameters of a stored round."""
    return RoundConfig(
        task_id=row.task_id,
        round=number,
        seed=row.seed,
        cohort=row.cohort,
        degree=row.degree,
        threshold=row.threshold,
        size=row.size,
        k=row.k,
        grid=Grid(bound=row.grid_bound, bits=row.grid_bits),
    )


def support_size(task: Task) -> tuple[int, int]:
    """``(size, k)``: the model's parameter count and the values each device sends (the
    task's upload ``topk_fraction`` of them, at least 1)."""
    size = ModelSpec.from_dict(task.model_spec).num_params
    fraction = CompressionPolicy.from_dict(task.compression).topk_fraction
    return size, max(1, min(size, round(fraction * size)))


def open_phases(
    session: Session,
    task: Task,
    rnd: Round,
    secure: SecureAggregationConfig,
    cfg: AggregationConfig,
    *,
    now: datetime,
) -> None:
    """Make the just opened round ``rnd`` a secure-aggregation round: its cohort is its
    assigned devices, numbered in device id order; phase ``advert`` opens."""
    assigned = session.execute(
        select(Assignment.id, Assignment.device_id)
        .where(Assignment.round_id == rnd.id)
        .order_by(Assignment.device_id)
    ).all()
    n = len(assigned)
    degree, threshold = plan_degree(n, dropout=secure.planned_dropout)
    size, k = support_size(task)
    row = SecAggRound(
        round_id=rnd.id,
        task_id=task.id,
        seed=secrets.token_bytes(32),
        cohort=n,
        degree=degree,
        threshold=threshold,
        size=size,
        k=k,
        grid_bound=secure.bound,
        grid_bits=secure.grid_bits,
        support_kind="random",
        support_version=rnd.base_version,
        phase="advert",
        phase_deadline_at=_deadline(cfg, "advert", now),
    )
    round_config(row, number=rnd.number)  # refuses parameters the protocol cannot run
    session.add(row)
    session.flush()
    session.add_all(
        SecAggMember(
            round_id=rnd.id,
            cohort_index=i,
            device_id=device_id,
            assignment_id=assignment_id,
            phase_reached="selected",
            dropped=False,
        )
        for i, (assignment_id, device_id) in enumerate(assigned)
    )
    session.flush()


def _deadline(cfg: AggregationConfig, phase: str, now: datetime) -> datetime:
    return now + timedelta(seconds=cfg.round_deadline_s * PHASE_SHARE[phase])


def lock_row(session: Session, round_id: int) -> SecAggRound | None:
    """The round's secure-aggregation row, locked for this transaction (``FOR UPDATE`` on
    PostgreSQL; SQLite serializes writers): a posted message and a phase change are ordered."""
    return session.scalar(
        select(SecAggRound)
        .where(SecAggRound.round_id == round_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def members(session: Session, round_id: int) -> list[SecAggMember]:
    return list(
        session.scalars(
            select(SecAggMember)
            .where(SecAggMember.round_id == round_id)
            .order_by(SecAggMember.cohort_index)
        )
    )


def verify_keys(session: Session, round_id: int) -> dict[int, Ed25519PublicKey]:
    """Cohort index -> the device's enrolment key (advertisements are signed with it)."""
    rows = session.execute(
        select(SecAggMember.cohort_index, Device.public_key)
        .join(Device, Device.id == SecAggMember.device_id)
        .where(SecAggMember.round_id == round_id)
    ).all()
    return {int(i): public_key_from_b64(key) for i, key in rows}


def advance(
    session: Session, task: Task, rnd: Round, cfg: AggregationConfig, *, now: datetime
) -> list[str]:
    """Close the round's current phase when it is due (everyone still in the round posted,
    or the deadline passed), and keep closing while the next one is due too."""
    row = lock_row(session, rnd.id)
    if row is None or rnd.status != RoundStatus.OPEN:
        return []
    woken: list[str] = []
    while row.phase in PHASES:
        everyone = members(session, rnd.id)
        active = _active_assignments(session, rnd.id)
        waiting = [
            m
            for m in _expected(everyone, row.phase)
            if getattr(m, POSTED[row.phase]) is None and m.assignment_id in active
        ]
        if waiting and now < row.phase_deadline_at:
            break
        woken += _close(session, task, rnd, cfg, row, everyone, now=now)
    return woken


def _active_assignments(session: Session, round_id: int) -> set[int]:
    return set(
        session.scalars(
            select(Assignment.id).where(
                Assignment.round_id == round_id, Assignment.status.in_(ASSIGNMENT_ACTIVE)
            )
        )
    )


def _expected(everyone: Sequence[SecAggMember], phase: str) -> list[SecAggMember]:
    """The members still in the round in ``phase`` (they completed every earlier one)."""
    return [m for m in everyone if not m.dropped and completed(m, PHASES.index(phase))]


def completed(m: SecAggMember, phases: int) -> bool:
    return all(getattr(m, POSTED[p]) is not None for p in PHASES[:phases])


@dataclass
class _Below(Exception):
    """A phase closed below its quorum."""

    detail: str


def _close(
    session: Session,
    task: Task,
    rnd: Round,
    cfg: AggregationConfig,
    row: SecAggRound,
    everyone: list[SecAggMember],
    *,
    now: datetime,
) -> list[str]:
    """Close the current phase: keep the members that posted, drop the others, check the
    quorum, write what the next phase serves, and open it (or fail the round)."""
    phase = row.phase
    rcfg = round_config(row, number=rnd.number)
    expected = _expected(everyone, phase)
    kept = [m for m in expected if getattr(m, POSTED[phase]) is not None]
    left = [m for m in expected if getattr(m, POSTED[phase]) is None]
    woken: list[str] = []
    if phase != "unmask":  # a silent survivor's input is in the sum all the same
        for m in left:
            m.dropped = True
        woken = _drop_assignments(session, [m.assignment_id for m in left], now=now)
    try:
        if phase == "advert":
            _advert_quorum(rcfg, kept, cfg)
        elif phase == "shares":
            _route_shares(rcfg, kept, cfg)
        elif phase == "masked":
            _unmask_lists(rcfg, everyone, kept, cfg)
        else:
            total, included = _unmask(rcfg, everyone)
            row.result_sum = total.astype("<u4").tobytes()
            row.num_included = len(included)
    except _Below as exc:
        return woken + _fail(session, rnd, row, phase, "below_threshold", exc.detail, now=now)
    except (SecAggError, WireFormatError) as exc:
        return woken + _fail(session, rnd, row, phase, exc.code, exc.detail, now=now)
    for m in kept:
        m.phase_reached = phase
    if phase == "unmask":
        row.phase = DONE
        session.flush()
        if rounds.set_round_status(
            session, rnd, expected=(RoundStatus.OPEN,), to=RoundStatus.AGGREGATING
        ):
            rnd.num_received = row.num_included or 0
        for m in left:
            end_member(session, m, now=now)
        return woken
    row.phase = PHASES[PHASES.index(phase) + 1]
    row.phase_deadline_at = _deadline(cfg, row.phase, now)
    session.flush()
    return woken


def _drop_assignments(session: Session, ids: list[int], *, now: datetime) -> list[str]:
    if not ids:
        return []
    chosen = list(session.scalars(select(Assignment).where(Assignment.id.in_(ids))))
    return rounds.end_assignments(session, chosen, status=AssignmentStatus.DROPPED, now=now)


def _fail(
    session: Session,
    rnd: Round,
    row: SecAggRound,
    phase: str,
    code: str,
    detail: str,
    *,
    now: datetime,
) -> list[str]:
    row.phase = FAILED
    reason = f"secure aggregation phase {phase}: {code}: {detail}"
    rounds.fail_round(session, rnd, reason=reason, now=now, expected=(RoundStatus.OPEN,))
    working = rounds.active_assignments(session, task_id=rnd.task_id, round_id=rnd.id)
    return rounds.end_assignments(session, working, status=AssignmentStatus.DROPPED, now=now)


def _need(count: int, cfg: AggregationConfig, what: str) -> None:
    if count < max(2, cfg.min_updates):
        raise _Below(f"{count} device(s) {what}, {max(2, cfg.min_updates)} needed (min_updates)")


def _neighbour_counts(rcfg: RoundConfig, devices: set[int], among: set[int]) -> dict[int, int]:
    return {u: sum(1 for v in rcfg.graph.neighbours[u] if v in among) for u in devices}


def _check_neighbours(rcfg: RoundConfig, devices: set[int], among: set[int], what: str) -> None:
    """Every device in ``devices`` has at least ``t`` neighbours in ``among``."""
    for u, n in sorted(_neighbour_counts(rcfg, devices, among).items()):
        if n < rcfg.threshold:
            raise _Below(f"device {u} has {n} neighbours that {what}, {rcfg.threshold} needed")


def _advert_quorum(rcfg: RoundConfig, kept: list[SecAggMember], cfg: AggregationConfig) -> None:
    _need(len(kept), cfg, "advertised keys")
    advertised = {m.cohort_index for m in kept}
    _check_neighbours(rcfg, advertised, advertised, "advertised keys")


def _route_shares(rcfg: RoundConfig, kept: list[SecAggMember], cfg: AggregationConfig) -> None:
    """The bundles each device that shared will open, regrouped by recipient and stored."""
    _need(len(kept), cfg, "sent shares")
    shared = {m.cohort_index for m in kept}
    _check_neighbours(rcfg, shared, shared, "sent shares")
    outgoing = {m.cohort_index: m.shares_out for m in kept if m.shares_out is not None}
    inbox = protocol.route_shares(rcfg, _only_to(rcfg, outgoing, shared))
    for m in kept:
        m.shares_in = inbox[m.cohort_index]


def _only_to(rcfg: RoundConfig, outgoing: dict[int, bytes], shared: set[int]) -> dict[int, bytes]:
    """The share messages with only the bundles to devices that shared too (a device that
    advertised and then went silent opens nothing)."""
    out = {}
    for u, data in outgoing.items():
        sender, sealed = decode_shares(rcfg, Kind.SHARES_OUT, data)
        out[u] = encode_shares(
            rcfg, Kind.SHARES_OUT, sender, [s for s in sealed if s.peer in shared]
        )
    return out


def _unmask_lists(
    rcfg: RoundConfig,
    everyone: list[SecAggMember],
    kept: list[SecAggMember],
    cfg: AggregationConfig,
) -> None:
    """Fix who uploaded (survivors) and who shared but did not (dropped), once."""
    _need(len(kept), cfg, "uploaded a masked update")
    shared = {m.cohort_index for m in everyone if completed(m, 2)}
    uploaded = {m.cohort_index for m in kept}
    # Each survivor's self-mask seed and each dropped device's mask key needs t answers
    # from neighbours that uploaded.
    _check_neighbours(rcfg, shared, uploaded, "uploaded (needed to unmask)")
    requests = protocol.unmask_requests(rcfg, shared, uploaded)
    for m in kept:
        m.unmask_request = requests[m.cohort_index]


def _unmask(rcfg: RoundConfig, everyone: list[SecAggMember]) -> tuple[np.ndarray, list[int]]:
    adverts: dict[int, Advert] = {
        m.cohort_index: decode_advert(rcfg, m.advert) for m in everyone if m.advert is not None
    }
    shared = {m.cohort_index for m in everyone if completed(m, 2)}
    masked = {
        m.cohort_index: m.masked
        for m in everyone
        if m.masked is not None and m.unmask_request is not None
    }
    responses = {
        m.cohort_index: m.unmask_response
        for m in everyone
        if m.unmask_response is not None and m.cohort_index in masked
    }
    return protocol.unmask(rcfg, adverts, shared, masked, responses)


@dataclass(frozen=True)
class SecureSum:
    """An unmasked round's result: the exact integer sum of ``count`` quantized inputs on the
    support, and the grid to read it with."""

    config: RoundConfig
    total: np.ndarray
    count: int

    def mean_delta(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        """The mean update (float64, model shapes): ``sum * B / s / count`` on the support,
        zero elsewhere."""
        grid = self.config.grid
        flat = np.zeros(self.config.size, dtype=np.float64)
        flat[self.config.support] = grid.decode_sum(self.total).astype(np.float64) * (
            grid.step / self.count
        )
        return unflatten(flat, spec)


def secure_sum(session: Session, rnd: Round) -> SecureSum | None:
    """The stored result of an unmasked round (None: the round is not a secure one, or not
    unmasked)."""
    row = session.get(SecAggRound, rnd.id)
    if row is None or row.result_sum is None or not row.num_included:
        return None
    rcfg = round_config(row, number=rnd.number)
    total = np.frombuffer(row.result_sum, dtype="<u4").astype(np.uint32)
    if total.shape != (rcfg.k,):
        raise ValueError(f"stored secure sum of round {rnd.id} has {total.size} words")
    return SecureSum(rcfg, total, int(row.num_included))


def end_member(session: Session, member: SecAggMember, *, now: datetime) -> None:
    """The device answered its unmask request: its part of the round is done (its
    assignment ends ``uploaded``; a new poll does not hand it the round again)."""
    session.execute(
        update(Assignment)
        .where(Assignment.id == member.assignment_id, Assignment.status.in_(ASSIGNMENT_ACTIVE))
        .values(status=AssignmentStatus.UPLOADED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
