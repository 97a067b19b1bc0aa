"""Check-in slots of a paced fleet and the fair rotation of its rounds (docs/rounds.md,
"Paced fleets").

Every device has one check-in slot per period ``T``, at a point of the period derived from
its id and the period's index (:func:`slot`): uniform over a fleet, different every period,
and independent of when a coordinator process started. The coordinator tells a device the
time to its next slot (:mod:`fedge.coordinator.engine.pace`), so it also knows when a device
it saw will come back (:func:`next_checkin`), and a round picks the devices that come within
its selection window, least often selected first (:func:`choose_paced`). A picked device
that does not come when expected (:func:`expected_checkin`; e.g. its check-in failed while the
coordinator was down, and it paused a random part of its period) is replaced by the round
(:func:`fedge.coordinator.engine.rounds.replace_missed`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from datetime import datetime

import numpy as np

from fedge.coordinator.engine.selection import Candidate


def slot(device_id: str, index: int, period: float) -> float:
    """The device's check-in time (seconds since the epoch) in period number ``index``."""
    digest = hashlib.blake2b(f"{device_id}:{index}".encode(), digest_size=8).digest()
    return (index + int.from_bytes(digest, "big") / 2.0**64) * period


def next_checkin(device_id: str, after: float, period: float) -> float:
    """The device's first slot strictly after ``after`` (epoch seconds)."""
    index = math.floor(after / period)
    at = slot(device_id, index, period)
    return at if at > after else slot(device_id, index + 1, period)


def expected_checkin(device_id: str, last_seen: float | None, start: float, period: float) -> float:
    """When a device last seen at ``last_seen`` (epoch seconds) is expected to check in first
    from ``start`` on, as :func:`choose_paced` reads it: its next slot after ``last_seen``; a
    slot that passed unseen before ``start`` counted whole periods later; ``start`` for a
    device never seen."""
    if last_seen is None:
        return start
    due = next_checkin(device_id, last_seen, period)
    if due < start - 1.0:
        due += period * math.ceil((start - due) / period)
    return due


def comes_within(
    device_id: str, last_seen: float | None, start: float, period: float, window: float
) -> bool:
    """Whether a device last seen at ``last_seen`` comes within ``window`` seconds from
    ``start`` by its next slot; never for a device whose slot passed unseen (offline, or its
    clock is off: it comes at an unknown time) or that was never seen."""
    if last_seen is None:
        return False
    due = next_checkin(device_id, last_seen, period)
    return start - 1.0 <= due <= start + window


def choose_paced(
    candidates: Sequence[Candidate],
    n: int,
    rng: np.random.Generator,
    *,
    now: datetime,
    period: float,
    window: float,
) -> list[str]:
    """Up to ``n`` device ids for a round of a paced fleet, in a fair rotation: first the
    devices whose next check-in (:func:`next_checkin` after they were last seen) falls within
    the selection window from ``now``, the least often selected (``num_assigned``) first and
    among those the ones due in the first half of the window, so that the cohort has checked
    in within about half the window rather than at its end, yet spread over that half (its
    uploads come a training time later, as spread as its check-ins); then the others by how
    soon they come; remaining ties in random order. A device whose slot passed
    unseen (offline, or its clock is off) comes at an unknown time: it follows the devices of
    the window whatever its slot."""
    if n <= 0 or not candidates:
        return []
    start = now.timestamp()
    due = np.array(
        [
            next_checkin(c.device_id, c.last_seen.timestamp(), period)
            if c.last_seen is not None
            else start
            for c in candidates
        ]
    )
    # A late device counts as coming a whole number of periods later, after the window's.
    late = due < start - 1.0
    due = np.where(late, due + period * np.ceil((start - due) / period), due)
    outside = (late | (due > start + window)).astype(np.int64)
    counts = np.array([c.num_assigned for c in candidates], dtype=np.int64)
    soon = np.where(outside == 1, due - start, 0.0)
    # The first half of the window before the second: the cohort checks in within about
    # half the window, and spread over it (its uploads follow a training time later).
    later = (due > start + window / 2).astype(np.int64)
    order = np.lexsort((rng.random(len(candidates)), later, counts, soon, outside))
    return [candidates[i].device_id for i in order[:n]]
