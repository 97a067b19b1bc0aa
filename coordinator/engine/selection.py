"""Which devices may take work, and which of them a sync round picks.

Eligible: status ``active`` (not revoked), live (seen within ``k`` of its poll intervals,
:class:`~fedge.coordinator.engine.eligibility.Liveness`), not busy (no assignment
``assigned``/``downloaded`` in any task), meeting the task's requirements
(:class:`~fedge.coordinator.engine.eligibility.Requirements`), and not a device that declined
this task since it last reported its capabilities (it would only decline again).

Selection is reliability-informed without starving anyone: each device's chance of
delivering is estimated by the mean of a Beta posterior with an optimistic prior,
``p = (A + completed) / (A + B + completed + dropped)`` with ``A = 3, B = 1`` (a new device
starts at 0.75), floored at ``P_MIN``. ``n`` devices are then drawn **without replacement
with probability proportional to p** (Efraimidis-Spirakis keys ``u ** (1 / p)``). Reliable
devices are preferred, a device that drops often is picked less often but is never shut
out, and a new device competes from the start instead of waiting for a track record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Select, exists, or_, select
from sqlalchemy.orm import Session, aliased

from fedge.coordinator.db import in_states
from fedge.coordinator.engine.eligibility import Liveness, Requirements
from fedge.coordinator.models import Assignment, Device
from fedge.coordinator.states import ASSIGNMENT_ACTIVE, DeviceStatus

PRIOR_SUCCESS = 3.0
PRIOR_FAILURE = 1.0
P_MIN = 0.05


@dataclass(frozen=True)
class Candidate:
    device_id: str
    num_completed: int
    num_dropped: int
    num_assigned: int = 0
    last_seen: datetime | None = None


def busy_clause() -> ColumnElement[bool]:
    """SQL condition: the device holds an active assignment in some task."""
    return exists().where(
        Assignment.device_id == Device.id, in_states(Assignment.status, ASSIGNMENT_ACTIVE)
    )


def declined_devices(task_id: int) -> Select[str]:
    """The devices that declined an assignment of the task after their last capability
    report (or never reported): one uncorrelated subquery, read once per statement rather
    than once per device row."""
    reporter = aliased(Device)
    return (
        select(Assignment.device_id)
        .join(reporter, reporter.id == Assignment.device_id)
        .where(
            Assignment.task_id == task_id,
            Assignment.decline_reason.is_not(None),
            or_(
                reporter.capabilities_at.is_(None),
                Assignment.finished_at >= reporter.capabilities_at,
            ),
        )
    )


def eligible_devices(
    session: Session,
    *,
    now: datetime,
    liveness: Liveness,
    requirements: Requirements | None = None,
    task_id: int | None = None,
    not_in_round: int | None = None,
    by_name: bool = False,
) -> list[Candidate]:
    """Active, live, idle devices meeting ``requirements`` (ordered by id, so selection is
    reproducible; with ``by_name`` by name, then id: the order two enrollments of one fleet
    share, whose ids are random). With ``task_id``: without the devices that declined that
    task since their last capability report; with ``not_in_round``: without the devices
    already assigned in that round."""
    since = now - timedelta(seconds=liveness.longest_window_s)
    wanted = requirements if requirements is not None and not requirements.empty else None
    # Only the capabilities the check needs, extracted in SQL: decoding every device's whole
    # tags and capabilities documents would cost more than the rest of the query.
    extra: dict[str, Any] = {}
    if wanted is not None:
        caps = Device.capabilities
        if wanted.tags:
            extra["tags"] = Device.tags
        if wanted.trainer is not None:
            extra["trainers"] = caps["trainers"]
        if wanted.feature_shape is not None:
            extra["feature_shape"] = caps["feature_shape"]
        if wanted.label_kind is not None:
            extra["label_kind"] = caps["label_kind"].as_string()
        if wanted.min_examples is not None:
            extra["num_examples"] = caps["num_examples"].as_integer()
    stmt = select(
        Device.id,
        Device.num_completed,
        Device.num_dropped,
        Device.num_assigned,
        Device.last_seen_at,
        Device.capabilities["poll_interval_s"].as_float(),
        *extra.values(),
    ).where(
        Device.status == DeviceStatus.ACTIVE,
        Device.last_seen_at.is_not(None),
        Device.last_seen_at >= since,
        ~busy_clause(),
    )
    if task_id is not None:
        stmt = stmt.where(Device.id.not_in(declined_devices(task_id)))
    if not_in_round is not None:
        stmt = stmt.where(
            Device.id.not_in(
                select(Assignment.device_id).where(Assignment.round_id == not_in_round)
            )
        )
    names = list(extra)
    found: list[Candidate] = []
    for device_id, completed, dropped, assigned, seen, poll, *values in session.execute(
        stmt.order_by(Device.name, Device.id) if by_name else stmt.order_by(Device.id)
    ):
        if now - seen > timedelta(seconds=liveness.window_for(poll)):
            continue
        if wanted is not None:
            got = dict(zip(names, values, strict=True))
            if wanted.unmet(got.pop("tags", None), got) is not None:
                continue
        found.append(Candidate(device_id, int(completed), int(dropped), int(assigned), seen))
    return found


def success_probability(completed: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """Posterior mean success rate under the optimistic Beta prior, floored at ``P_MIN``."""
    c = np.asarray(completed, dtype=np.float64)
    d = np.asarray(dropped, dtype=np.float64)
    p = (PRIOR_SUCCESS + c) / (PRIOR_SUCCESS + PRIOR_FAILURE + c + d)
    return np.maximum(p, P_MIN)


def choose(
    candidates: Sequence[Candidate], n: int, rng: np.random.Generator, *, uniform: bool = False
) -> list[str]:
    """Up to ``n`` device ids, drawn without replacement with probability proportional to
    their estimated success rate, or with equal probability when ``uniform`` (differential
    privacy: every eligible device is in the sample with probability ``n / len(candidates)``,
    the sampling rate the accountant charges)."""
    if n <= 0 or not candidates:
        return []
    if len(candidates) <= n:
        return [c.device_id for c in candidates]
    if uniform:
        p = np.ones(len(candidates))
    else:
        p = success_probability(
            np.array([c.num_completed for c in candidates]),
            np.array([c.num_dropped for c in candidates]),
        )
    # Efraimidis-Spirakis: the n largest keys u^(1/p) form a weighted sample without
    # replacement. Compare log-keys log(u)/p for numerical range.
    keys = np.log(rng.random(len(candidates))) / p
    picked = np.argsort(-keys, kind="stable")[:n]
    return [candidates[i].device_id for i in np.sort(picked)]
