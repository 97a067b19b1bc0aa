"""Server optimizers: FedAvg, FedAvgM (momentum) and the adaptive ones."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.strategies import (
    FedAdaptive,
    FedAvg,
    FedAvgM,
    make_strategy,
    state_from_bytes,
    state_to_bytes,
)


def _w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def _d(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float64)}


@pytest.mark.parametrize(("lr", "expected"), [(1.0, [1.5, 0.0, -1.0]), (0.5, [1.0, 1.0, 0.0])])
def test_fedavg_step(lr: float, expected: list[float]) -> None:
    new, state = FedAvg(lr=lr).step(_w(0.5, 2.0, 1.0), _d(1.0, -2.0, -2.0), {})
    np.testing.assert_allclose(new["w"], expected)
    assert new["w"].dtype == np.float32
    assert state == {}


def test_fedavgm_accumulates_momentum_by_hand() -> None:
    strategy = FedAvgM(lr=1.0, momentum=0.5)
    w1, s1 = strategy.step(_w(0.0, 0.0), _d(1.0, 2.0), {})
    np.testing.assert_allclose(w1["w"], [1.0, 2.0])
    np.testing.assert_allclose(s1["m/w"], [1.0, 2.0])
    # m2 = 0.5 * [1, 2] + [1, 0] = [1.5, 1]; w2 = [1, 2] + [1.5, 1]
    w2, s2 = strategy.step(w1, _d(1.0, 0.0), s1)
    np.testing.assert_allclose(s2["m/w"], [1.5, 1.0])
    np.testing.assert_allclose(w2["w"], [2.5, 3.0])


def test_momentum_state_survives_serialization() -> None:
    strategy = FedAvgM(lr=0.5, momentum=0.9)
    _, state = strategy.step(_w(0.0, 0.0), _d(1.0, -1.0), {})
    restored = state_from_bytes(state_to_bytes(state))
    assert restored.keys() == state.keys()
    np.testing.assert_array_equal(restored["m/w"], state["m/w"])
    a, _ = strategy.step(_w(1.0, 1.0), _d(0.5, 0.5), state)
    b, _ = strategy.step(_w(1.0, 1.0), _d(0.5, 0.5), restored)
    np.testing.assert_array_equal(a["w"], b["w"])


@pytest.mark.parametrize("yogi", [False, True])
def test_adaptive_step_without_moment_decay_is_a_sign_step(yogi: bool) -> None:
    # With beta1 = beta2 = 0 the first step is lr * d / (|d| + eps) ~ lr * sign(d).
    strategy = FedAdaptive(lr=0.1, beta1=0.0, beta2=0.0, eps=1e-9, yogi=yogi)
    new, state = strategy.step(_w(1.0, 1.0, 1.0), _d(3.0, -0.25, 2.0), {})
    np.testing.assert_allclose(new["w"], [1.1, 0.9, 1.1], rtol=1e-6)
    assert set(state) == {"m/w", "v/w"}


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        ({}, FedAvg),
        ({"server_momentum": 0.9}, FedAvgM),
        ({"strategy": "fedavgm", "server_momentum": 0.5}, FedAvgM),
        ({"strategy": "fedadam"}, FedAdaptive),
        ({"strategy": "fedyogi"}, FedAdaptive),
    ],
)
def test_make_strategy(data: dict, kind: type) -> None:
    assert isinstance(make_strategy(AggregationConfig.from_dict(data)), kind)
