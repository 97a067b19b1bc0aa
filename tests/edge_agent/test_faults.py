"""Simulated faults: seeded, within their bounds, at the configured rates."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedge.edge_agent.client import Work
from fedge.edge_agent.sim.faults import (
    NO_FAULTS,
    FaultConfig,
    FaultDecision,
    FaultHooks,
    FaultSchedule,
)


def decisions(config, seed=0, n=4000):
    schedule = FaultSchedule(config, np.random.default_rng(seed))
    return [schedule.decide(i) for i in range(n)]


def test_rates_and_bounds():
    config = FaultConfig(
        dropout=0.2, straggler_scale_s=0.5, straggler_cap_s=3.0, offline=0.1, offline_s=(1, 2)
    )
    ds = decisions(config)
    drop_rate = np.mean([d.drop for d in ds])
    offline = [d.offline_s for d in ds if d.offline_s > 0]
    delays = np.array([d.delay_s for d in ds])
    assert drop_rate == pytest.approx(0.2, abs=0.03)
    assert len(offline) / len(ds) == pytest.approx(0.1, abs=0.02)
    assert all(1 <= s <= 2 for s in offline)
    assert delays.max() <= 3.0 and delays.min() >= 0
    # heavy tail: the mean is well above the median and some hit the cap
    assert delays.mean() > 1.5 * np.median(delays)
    assert (delays == 3.0).any()


def test_seeded_and_stable_per_assignment():
    config = FaultConfig(dropout=0.5, straggler_scale_s=1.0)
    assert decisions(config, seed=3, n=50) == decisions(config, seed=3, n=50)
    assert decisions(config, seed=3, n=50) != decisions(config, seed=4, n=50)
    schedule = FaultSchedule(config, np.random.default_rng(0))
    first = schedule.decide(7)
    schedule.decide(8)
    assert schedule.decide(7) == first


def test_no_faults():
    d = NO_FAULTS.decide(1)
    assert not d.drop and d.delay_s == 0 and d.offline_s == 0


@pytest.mark.parametrize(
    "kwargs", [{"dropout": 1.5}, {"offline": -0.1}, {"straggler_shape": 0}, {"offline_s": (2, 1)}]
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        FaultConfig(**kwargs)


class Fixed:
    """A fault source that always decides the same."""

    def __init__(self, decision: FaultDecision) -> None:
        self.decision = decision

    def decide(self, assignment_id: int) -> FaultDecision:
        return self.decision


WORK = Work(assignment_id=5, status="assigned", task_id=1)


@pytest.mark.parametrize(
    ("decision", "keeps", "holds_back"),
    [
        (FaultDecision(), True, False),
        (FaultDecision(drop=True), False, False),
        (FaultDecision(offline_s=100.0), True, True),
    ],
)
def test_fault_hooks_turn_decisions_into_hook_answers(decision, keeps, holds_back):
    hooks = FaultHooks(Fixed(decision))
    stop = threading.Event()
    stop.set()  # a long offline spell ends at once when the agent stops
    assert hooks.keep_assignment(WORK) is keeps
    assert hooks.before_first_upload(WORK, stop) is holds_back


def test_a_straggler_delay_waits_on_the_agents_event():
    class Event(threading.Event):
        waited: list[float | None] = []

        def wait(self, timeout=None):
            self.waited.append(timeout)
            return True

    interrupted = Event()
    FaultHooks(Fixed(FaultDecision(delay_s=2.5))).before_training(WORK, interrupted)
    FaultHooks(Fixed(FaultDecision())).before_training(WORK, interrupted)
    assert Event.waited == [2.5]


def test_training_is_seeded_by_the_assignment_or_by_task_and_version():
    other = Work(assignment_id=9, status="assigned", task_id=1)
    later = Work(assignment_id=9, status="assigned", task_id=1, base_version=1)
    plain = FaultHooks(Fixed(FaultDecision()))
    assert plain.training_entropy(WORK) == (5,) != plain.training_entropy(other)
    by_version = FaultHooks(Fixed(FaultDecision()), seed_by_version=True)
    assert by_version.training_entropy(WORK) == by_version.training_entropy(other) == (1, 0)
    assert by_version.training_entropy(later) == (1, 1)
