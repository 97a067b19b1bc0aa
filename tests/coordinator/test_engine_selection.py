"""Reliability-informed selection that does not starve new devices."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.engine.selection import P_MIN, Candidate, choose, success_probability


def test_success_probability_is_the_optimistic_posterior_mean() -> None:
    p = success_probability(np.array([0, 9, 0, 0]), np.array([0, 0, 4, 1000]))
    # (3 + c) / (4 + c + d), floored at P_MIN
    np.testing.assert_allclose(p, [0.75, 12 / 13, 3 / 8, P_MIN])


def test_choose_returns_distinct_devices_reproducibly() -> None:
    pool = [Candidate(f"d{i:02d}", i % 5, i % 3) for i in range(30)]
    a = choose(pool, 13, np.random.default_rng(5))
    b = choose(pool, 13, np.random.default_rng(5))
    assert a == b
    assert len(a) == len(set(a)) == 13
    assert set(a) <= {c.device_id for c in pool}


@pytest.mark.parametrize("n", [0, -1])
def test_choose_nothing(n: int) -> None:
    assert choose([Candidate("a", 0, 0)], n, np.random.default_rng(0)) == []


def test_small_pool_is_taken_whole() -> None:
    pool = [Candidate("a", 0, 9), Candidate("b", 5, 0)]
    assert choose(pool, 5, np.random.default_rng(0)) == ["a", "b"]


def _pick_rates(pool: list[Candidate], n: int, trials: int) -> dict[str, float]:
    rng = np.random.default_rng(11)
    counts = dict.fromkeys((c.device_id for c in pool), 0)
    for _ in range(trials):
        for device_id in choose(pool, n, rng):
            counts[device_id] += 1
    return {k: v / trials for k, v in counts.items()}


def test_reliable_devices_are_preferred_and_nobody_is_starved() -> None:
    reliable = [Candidate(f"r{i}", 50, 0) for i in range(10)]
    flaky = [Candidate(f"f{i}", 2, 30) for i in range(10)]
    new = [Candidate(f"n{i}", 0, 0) for i in range(10)]
    rates = _pick_rates(reliable + flaky + new, 10, 2000)
    mean = {g: np.mean([rates[f"{g}{i}"] for i in range(10)]) for g in "rfn"}
    assert mean["r"] > mean["n"] > mean["f"]
    # New devices compete from the start: picked in a good share of rounds.
    assert mean["n"] > 0.25
    # Flaky ones are picked less, but never shut out.
    assert min(rates[f"f{i}"] for i in range(10)) > 0.02
