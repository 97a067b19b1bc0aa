"""How long the agent waits after a request failed, by what it holds (docs/agent.md,
"Outages"; docs/protocol.md, "Pace steering").

An **idle** device of a paced fleet (:func:`paced_retry_s`) pauses a uniformly random part
of its pacing interval: every device that failed during an outage would otherwise come back
within seconds of the coordinator's return, a herd of all the check-ins the outage held back.

A device that **holds work** for an open round (an assignment it fetched, an update in its
outbox) has a deadline to meet and is one of a round's few devices, not of the idle fleet:
it retries soon, with an exponential, capped and jittered backoff that stays within the
round's deadline (:class:`WorkRetry`), a bounded number of times; then it falls back to the
idle pause (the update stays in the outbox and goes out later). A round's cohort is
``clients_per_round * (1 + over_selection)`` devices whose check-ins were spread over a
selection window, so their retries add a few requests a second at most, jittered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np


def paced_retry_s(reconnect_s: float | None, pause_s: float, rng: np.random.Generator) -> float:
    """Seconds an idle device waits after the coordinator could not be reached. A device the
    coordinator paces (docs/protocol.md, "Pace steering"; it was last told to come back in
    ``reconnect_s``; its client tries such a check-in once) waits a uniformly random time
    between ``pause_s`` and that interval: every device of a paced fleet that failed during
    an outage would otherwise come back within seconds of the coordinator's return, a herd
    of all the check-ins the outage held back; spread over the pacing interval they add
    about ``outage / interval`` to the mean rate. An unpaced (long-polling) device waits
    ``pause_s`` (after its client's retries)."""
    if reconnect_s is None or reconnect_s <= pause_s:
        return pause_s
    return pause_s + float(rng.random()) * (reconnect_s - pause_s)


@dataclass(frozen=True)
class WorkRetry:
    """The retries of a device that holds work after a failed request: pause number ``k``
    (1-based) is ``min(cap_s, base_s * 2**(k-1), remaining / 2)`` times a uniform factor in
    [0.5, 1] (``remaining``: seconds to the round's deadline, when known), for at most
    ``attempts`` pauses in a row and never once the deadline passed."""

    attempts: int = 8
    base_s: float = 1.0
    cap_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError("WorkRetry needs attempts, base_s and cap_s of at least 0")

    def pause_s(
        self, failures: int, remaining_s: float | None, rng: np.random.Generator
    ) -> float | None:
        """The pause after ``failures`` failures in a row, or ``None`` when the quick
        retries are over (their number used up, or the deadline passed): the caller then
        takes the idle pause (:func:`paced_retry_s`)."""
        if failures < 1 or failures > self.attempts:
            return None
        if remaining_s is not None and not remaining_s > 0:
            return None
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 60))
        if remaining_s is not None:
            ceiling = min(ceiling, remaining_s / 2)
        return ceiling * (0.5 + 0.5 * float(rng.random()))


def deadline_s(value: str | None) -> float | None:
    """An assignment's deadline (ISO 8601, as a work answer carries it) in seconds since the
    epoch; ``None`` when absent or unreadable (then only the number of retries bounds them)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:  # the coordinator says UTC; never trust a local reading
        return None
    at = parsed.timestamp()
    return at if math.isfinite(at) else None
