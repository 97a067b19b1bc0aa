"""A paced device's pause after the coordinator could not be reached
(:func:`fedge.edge_agent.agent.paced_retry_s`): retries spread over the pacing interval, so a
coordinator restart is not followed by a herd of the check-ins it held back."""

from __future__ import annotations

import numpy as np

from fedge.edge_agent.agent import paced_retry_s

PAUSE_S = 5.0


def test_unpaced_device_pauses_the_fixed_time_and_paced_one_within_its_interval() -> None:
    rng = np.random.default_rng(0)
    assert paced_retry_s(None, PAUSE_S, rng) == PAUSE_S  # long-poll: as before
    assert paced_retry_s(3.0, PAUSE_S, rng) == PAUSE_S  # a shorter interval: the pause
    draws = np.array([paced_retry_s(600.0, PAUSE_S, rng) for _ in range(4000)])
    assert draws.min() >= PAUSE_S and draws.max() <= 600.0
    # Uniform over [pause, interval]: each tenth holds about a tenth of the draws.
    tenths = np.bincount(((draws - PAUSE_S) / (600.0 - PAUSE_S) * 10).astype(int), minlength=10)
    assert tenths.min() > 300 and tenths.max() < 500, tenths


def _after_outage(pause: object, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Check-ins per second of a paced fleet (20,000 devices, period 1,540 s: one slot per
    device and period at a uniformly random point, as the coordinator hands them out) around
    a 60 s outage: (the 300 s before it, the 300 s after it). A device that finds the
    coordinator down pauses ``pause(interval, rng)`` (``interval``: the time it was last
    told to sleep) and tries again; one that gets through is told its next slot."""
    rng = np.random.default_rng(seed)
    n, period, down_at, up_at, end = 20_000, 1540.0, 6000.0, 6060.0, 6400.0
    slots = (np.arange(6)[None, :] + rng.random((n, 6))) * period  # 6 periods
    rows = np.arange(n)
    at = slots[:, 0]
    told = slots[:, 0]  # the first interval: as if told at time 0
    arrivals = []
    while np.isfinite(at).any():
        live = at < end
        arrivals.append(at[live])
        failed = live & (at >= down_at) & (at < up_at)
        ok = live & ~failed
        index = np.floor(np.where(live, at, 0.0) / period).astype(int)
        this = slots[rows, np.minimum(index, 5)]
        upcoming = np.where(this > at, this, slots[rows, np.minimum(index + 1, 5)])
        told = np.where(ok, upcoming - at, told)
        pauses = np.array([pause(i, rng) for i in told[failed]])  # type: ignore[operator]
        at = np.where(ok, upcoming, at)
        at[failed] += pauses
        at[~live] = np.inf
    times = np.concatenate(arrivals)
    before = np.bincount((times[(times >= 5700) & (times < 6000)] - 5700).astype(int))
    after = np.bincount((times[(times >= up_at) & (times < up_at + 300)] - up_at).astype(int))
    return before, after


def _five(counts: np.ndarray) -> np.ndarray:
    return counts[: counts.size // 5 * 5].reshape(-1, 5).sum(axis=1)


def test_a_restart_is_not_followed_by_a_herd() -> None:
    for seed in (1, 2, 3):
        before, after = _after_outage(lambda i, r: paced_retry_s(i, PAUSE_S, r), seed=seed)
        # The outage adds no more to the peak than random arrivals do: per second (as the
        # benchmark counts) and in 5 s bins, against the steady minutes before it.
        assert after.max() <= 1.25 * before.max(), (after.max(), before.max())
        assert _five(after).max() <= 1.5 * _five(before).mean()
        assert after.mean() <= 1.1 * before.mean()
    # The fixed pause (what every device did before) brings the held-back check-ins back
    # within seconds of the coordinator's return: the test can tell the difference.
    _, herd = _after_outage(lambda i, r: PAUSE_S, seed=1)
    assert herd.max() > 4 * before.mean()
