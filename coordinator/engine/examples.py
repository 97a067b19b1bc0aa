"""How many of an update's claimed examples count for its weight.

A device states ``num_examples`` itself and nothing proves it, yet with the default weighting
it sets the update's share of the aggregate. Three bounds keep one claim from taking it over
(docs/rounds.md, "Update bounds"):

1. **task cap** (upload): a claim above the task's ``max_num_examples`` is refused with 422
   ``num_examples_out_of_range`` (:func:`check_claim`);
2. **device history** (upload): a claim counts at most ``GROWTH`` times the largest count of
   the same device's last ``HISTORY`` accepted or applied updates in the task; a device's first
   claim counts in full (:func:`bounded_by_history`, :func:`counted_examples`). The result is
   stored as ``Update.num_examples_counted`` and is what the upload answer's weight uses;
3. **cohort** (aggregation): each count is clipped to ``COHORT_FACTOR`` times the lower median
   of the counts aggregated together (:func:`cohort_clip`), so one update's share of the
   examples is at most ``COHORT_FACTOR / (COHORT_FACTOR + k - 1)`` where ``k`` is the number of
   updates counting at least that median (at least half of them), whatever its history.

Honest devices whose data size is stable are not affected by 2; 3 only trims counts more than
``COHORT_FACTOR`` times the typical one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.db import in_states
from fedge.coordinator.errors import Unprocessable
from fedge.coordinator.models import Update
from fedge.coordinator.states import UPDATE_COUNTED

#: A claim counts at most this many times the device's recent largest count. (4 rather than 2:
#: a device's data may well grow fourfold between uploads early on, e.g. 10 then 40 examples,
#: and the share bound comes from the cohort clip, not from this.)
GROWTH = 4
#: How many of the device's latest accepted or applied updates in the task form its history.
HISTORY = 10
#: At aggregation, a count is clipped to this many times the cohort's lower median.
COHORT_FACTOR = 4


def check_claim(claimed: int, *, cap: int) -> None:
    """Refuse (422 ``num_examples_out_of_range``) a claim above the task's
    ``max_num_examples``."""
    if claimed > cap:
        raise Unprocessable(
            f"the update claims {claimed} examples; this task accepts at most {cap} "
            "(aggregation.max_num_examples)",
            code="num_examples_out_of_range",
        )


def bounded_by_history(claimed: int, history: Sequence[int]) -> int:
    """``min(claimed, GROWTH * max(history))``; the claim itself when there is no history."""
    if not history:
        return claimed
    return min(claimed, GROWTH * max(history))


def stored_count(counted: int | None, claimed: int, *, cap: int) -> int:
    """The count of a stored update: its ``num_examples_counted``, or for rows written before
    that column existed, the claim capped by the task's ``max_num_examples``."""
    return min(claimed, cap) if counted is None else counted


def device_history(
    session: Session, *, task_id: int, device_id: str, cap: int, limit: int = HISTORY
) -> list[int]:
    """Counts of the device's latest ``limit`` accepted or applied updates in the task."""
    rows = session.execute(
        select(Update.num_examples_counted, Update.num_examples)
        .where(
            Update.task_id == task_id,
            Update.device_id == device_id,
            in_states(Update.status, UPDATE_COUNTED),
        )
        .order_by(Update.id.desc())
        .limit(limit)
    ).all()
    return [stored_count(counted, claimed, cap=cap) for counted, claimed in rows]


def counted_examples(
    session: Session, *, task_id: int, device_id: str, claimed: int, cap: int
) -> int:
    """The count a new claim gets (bound 2 of the module docstring)."""
    return bounded_by_history(
        claimed, device_history(session, task_id=task_id, device_id=device_id, cap=cap)
    )


def cohort_clip(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Counts clipped to ``COHORT_FACTOR`` times their lower median (int64; bound 3)."""
    x = np.asarray(counts, dtype=np.int64)
    if x.size == 0:
        return x
    mid = (x.size - 1) // 2
    lower_median = np.partition(x, mid)[mid]
    return np.minimum(x, COHORT_FACTOR * lower_median)
