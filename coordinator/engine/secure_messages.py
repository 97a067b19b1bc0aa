"""What a device of a secure-aggregation round posts and fetches, checked against the round's
stored state (the endpoints of :mod:`fedge.coordinator.api.secagg`).

Each function runs in the caller's transaction, locks the round's ``secagg_rounds`` row first
(so a message and a phase change are ordered) and raises the API's errors:

- 404 ``not_found``: no such secure-aggregation round, or the device is not in its cohort;
- 425 ``phase_not_ready``: the phase that serves (or accepts) this message has not opened;
- 409: ``round_ended`` (failed or finished; the detail says why), ``phase_closed`` (the
  phase that accepted this message is over), ``not_in_phase`` (the device missed an earlier
  phase and is out of the round), ``message_differs`` (the device posted a different
  message in this phase; the same message again is answered as a duplicate);
- 400 with the wire code for a malformed message, 422 with the protocol code
  (:data:`fedge.shared.secagg.errors.CODES`) for a well-formed one that does not fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.engine import secure
from fedge.coordinator.errors import BadRequest, Conflict, NotFound, TooEarly, Unprocessable
from fedge.coordinator.models import Device, Round, SecAggMember, SecAggRound
from fedge.coordinator.states import RoundStatus
from fedge.shared.secagg import RoundConfig, SecAggError, protocol
from fedge.shared.secagg.messages import (
    Kind,
    ShareKind,
    decode_advert,
    decode_masked,
    decode_shares,
    decode_unmask_request,
    decode_unmask_response,
    encode_advert_list,
)
from fedge.shared.signing import public_key_from_b64
from fedge.shared.wireerror import WireFormatError

__all__ = ["FETCHED", "Posted", "config_of", "fetch", "post"]

#: What a device fetches, and the phase whose close produces it.
FETCHED = {"adverts": "advert", "shares": "shares", "unmask": "masked"}


@dataclass(frozen=True)
class Posted:
    phase: str
    duplicate: bool


@contextmanager
def refusals() -> Iterator[None]:
    """Wire errors as 400 (their code), protocol errors as 422 (their code)."""
    try:
        yield
    except WireFormatError as exc:
        raise BadRequest(exc.detail, code=exc.code) from None
    except SecAggError as exc:
        raise Unprocessable(exc.detail, code=exc.code) from None


def _load(
    session: Session, device_id: str, round_id: int
) -> tuple[SecAggRound, Round, SecAggMember, RoundConfig]:
    row = secure.lock_row(session, round_id)
    rnd = session.get(Round, round_id)
    member = session.scalar(
        select(SecAggMember).where(
            SecAggMember.round_id == round_id, SecAggMember.device_id == device_id
        )
    )
    if row is None or rnd is None or member is None:
        raise NotFound(f"device {device_id} is in no secure-aggregation round {round_id}")
    return row, rnd, member, secure.round_config(row, number=rnd.number)


def _phase_at(row: SecAggRound) -> int:
    """The position of the round's phase in :data:`secure.PHASES` (past the end once done)."""
    return secure.PHASES.index(row.phase) if row.phase in secure.PHASES else len(secure.PHASES)


def _ended(row: SecAggRound, rnd: Round) -> bool:
    return row.phase == secure.FAILED or rnd.status in (RoundStatus.FAILED, RoundStatus.CLOSED)


def _round_ended(rnd: Round) -> Conflict:
    why = rnd.status_reason or f"the round is {rnd.status}"
    return Conflict(f"round {rnd.number} ended: {why}", code="round_ended")


def config_of(session: Session, device_id: str, round_id: int) -> dict[str, Any]:
    """The round's public parameters, the device's cohort index and every member's enrolment
    key (by index: advertisements are signed with them)."""
    row, rnd, member, _ = _load(session, device_id, round_id)
    keys = session.execute(
        select(SecAggMember.cohort_index, Device.public_key)
        .join(Device, Device.id == SecAggMember.device_id)
        .where(SecAggMember.round_id == round_id)
        .order_by(SecAggMember.cohort_index)
    ).all()
    return {
        "round_id": rnd.id,
        "task_id": row.task_id,
        "round": rnd.number,
        "base_version": rnd.base_version,
        "seed": row.seed.hex(),
        "cohort": row.cohort,
        "degree": row.degree,
        "threshold": row.threshold,
        "size": row.size,
        "k": row.k,
        "bound": row.grid_bound,
        "bits": row.grid_bits,
        "support": row.support_kind,
        "index": member.cohort_index,
        "phase": row.phase if not _ended(row, rnd) else secure.FAILED,
        "phase_deadline": row.phase_deadline_at.isoformat(),
        "public_keys": [key for _, key in keys],
    }


def post(
    session: Session, device_id: str, round_id: int, phase: str, body: bytes, *, now: datetime
) -> Posted:
    """Store the device's message of ``phase`` (one of :data:`secure.PHASES`)."""
    row, rnd, member, rcfg = _load(session, device_id, round_id)
    column = secure.POSTED[phase]
    stored = getattr(member, column)
    if stored is not None:
        if stored == body:
            return Posted(phase, duplicate=True)
        raise Conflict(
            f"this device posted a different {phase} message in round {rnd.number}",
            code="message_differs",
        )
    if _ended(row, rnd):
        raise _round_ended(rnd)
    at = secure.PHASES.index(phase)
    current = _phase_at(row)
    if current < at:
        raise TooEarly(f"phase {phase} has not opened yet (the round is in {row.phase})")
    if current > at:
        raise Conflict(
            f"phase {phase} is closed (the round is in {row.phase})", code="phase_closed"
        )
    if member.dropped or not secure.completed(member, at):
        raise _out_of_round(device_id)
    with refusals():
        _check(session, rcfg, member, phase, body, device_id)
    setattr(member, column, body)
    if phase == "unmask":
        secure.end_member(session, member, now=now)
    session.flush()
    return Posted(phase, duplicate=False)


def _check(
    session: Session,
    rcfg: RoundConfig,
    member: SecAggMember,
    phase: str,
    body: bytes,
    device_id: str,
) -> None:
    index = member.cohort_index
    if phase == "advert":
        advert = decode_advert(rcfg, body)
        _same(advert.index, index)
        key = session.scalar(select(Device.public_key).where(Device.id == device_id))
        protocol.check_advert(rcfg, advert, public_key_from_b64(str(key)))
    elif phase == "shares":
        sender, sealed = decode_shares(rcfg, Kind.SHARES_OUT, body)
        _same(sender, index)
        advertised = {
            m.cohort_index for m in secure.members(session, member.round_id) if m.advert is not None
        }
        expected = {v for v in rcfg.graph.neighbours[index] if v in advertised}
        if {s.peer for s in sealed} != expected:
            raise SecAggError(
                "inconsistent_sets", "the bundles must go to exactly the advertised neighbours"
            )
    elif phase == "masked":
        sender, _ = decode_masked(rcfg, body)
        _same(sender, index)
    else:
        sender, entries = decode_unmask_response(rcfg, body)
        _same(sender, index)
        request = decode_unmask_request(rcfg, member.unmask_request or b"")
        asked = {(v, ShareKind.SELF_MASK_SEED) for v in request.survivors}
        asked |= {(v, ShareKind.MASK_KEY) for v in request.dropped}
        if {(owner, kind) for owner, kind, _ in entries} != asked:
            raise SecAggError("inconsistent_sets", "the answer does not match the request")


def _same(sender: int, index: int) -> None:
    if sender != index:
        raise SecAggError("unknown_device", f"device {index} sent a message as device {sender}")


def fetch(session: Session, device_id: str, round_id: int, what: str) -> bytes:
    """``adverts`` (its advertised neighbours' adverts), ``shares`` (the bundles addressed to
    it) or ``unmask`` (its unmask request), once the phase that produces it has closed."""
    row, rnd, member, rcfg = _load(session, device_id, round_id)
    if _ended(row, rnd):
        raise _round_ended(rnd)
    produced_by = secure.PHASES.index(FETCHED[what])
    current = _phase_at(row)
    if current <= produced_by:
        raise TooEarly(f"the round is in phase {row.phase}; {what} are not ready")
    if member.dropped or not secure.completed(member, produced_by + 1):
        raise _out_of_round(device_id)
    if what == "adverts":
        near = set(rcfg.graph.neighbours[member.cohort_index])
        adverts = [
            decode_advert(rcfg, m.advert)
            for m in secure.members(session, round_id)
            if m.advert is not None and m.cohort_index in near
        ]
        return encode_advert_list(rcfg, adverts)
    data = member.shares_in if what == "shares" else member.unmask_request
    if data is None:  # the phase closed without this device (it stays out)
        raise _out_of_round(device_id)
    return data


def _out_of_round(device_id: str) -> Conflict:
    return Conflict(
        f"device {device_id} is out of the round: it missed a phase", code="not_in_phase"
    )
