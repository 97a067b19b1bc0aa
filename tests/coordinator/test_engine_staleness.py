"""Staleness functions and update weights."""

from __future__ import annotations

import itertools
import math

import pytest

from fedge.coordinator.engine.staleness import StalenessConfig, staleness_factor, update_weight


@pytest.mark.parametrize(
    ("config", "tau", "expected"),
    [
        (StalenessConfig(function="constant"), 0, 1.0),
        (StalenessConfig(function="constant"), 7, 1.0),
        (StalenessConfig(function="polynomial", a=0.5), 0, 1.0),
        (StalenessConfig(function="polynomial", a=0.5), 3, 0.5),  # (1+3)^-0.5
        (StalenessConfig(function="polynomial", a=1.0), 4, 0.2),  # (1+4)^-1
        (StalenessConfig(function="polynomial", a=2.0), 1, 0.25),
        (StalenessConfig(function="hinge", a=0.5, b=2), 0, 1.0),
        (StalenessConfig(function="hinge", a=0.5, b=2), 2, 1.0),
        (StalenessConfig(function="hinge", a=0.5, b=2), 4, 0.5),  # 1/(0.5*2+1)
        (StalenessConfig(function="hinge", a=2.0, b=1), 3, 0.2),  # 1/(2*2+1)
    ],
)
def test_staleness_factor_at_chosen_tau(config: StalenessConfig, tau: int, expected: float) -> None:
    assert math.isclose(staleness_factor(config, tau), expected, rel_tol=1e-12)


def test_polynomial_decreases_with_staleness() -> None:
    config = StalenessConfig(function="polynomial", a=0.5)
    values = [staleness_factor(config, tau) for tau in range(10)]
    assert all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(("weighting", "expected"), [("num_examples", 40 * 0.5), ("equal", 0.5)])
def test_update_weight(weighting: str, expected: float) -> None:
    config = StalenessConfig(function="polynomial", a=0.5)
    assert update_weight(config, tau=3, num_examples=40, weighting=weighting) == pytest.approx(
        expected
    )


def test_negative_staleness_is_an_error() -> None:
    with pytest.raises(ValueError, match="negative"):
        staleness_factor(StalenessConfig(), -1)


@pytest.mark.parametrize(
    "data",
    [
        {"function": "exponential"},
        {"a": -1},
        {"a": 0},
        {"a": 1001},
        {"b": float("nan")},
        {"b": 1.5},
        {"b": -1},
        {"b": True},
        {"c": 1},
        {"a": "x"},
    ],
)
def test_invalid_config_is_rejected(data: dict) -> None:
    with pytest.raises(ValueError):
        StalenessConfig.from_dict(data)


def test_defaults_and_round_trip() -> None:
    config = StalenessConfig.from_dict({})
    assert config.to_dict() == {"function": "polynomial", "a": 0.5, "b": 4}
    assert StalenessConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "data",
    [
        {"a": 1000},
        {"a": 1e-9},
        {"a": 3},  # an integer is a number
        {"b": 0},
        {"b": 1_000_000},
        {"function": "constant"},
        {"function": "hinge", "a": 2.0, "b": 0},
    ],
)
def test_valid_config_bounds(data: dict) -> None:
    config = StalenessConfig.from_dict(data)
    assert {k: config.to_dict()[k] for k in data} == data


@pytest.mark.parametrize(
    "data", [{"a": 1000.001}, {"a": 0.0}, {"b": 1_000_001}, {"a": float("inf")}, {"b": "4"}]
)
def test_config_bounds_are_enforced(data: dict) -> None:
    with pytest.raises(ValueError):
        StalenessConfig.from_dict(data)


def test_from_dict_wants_a_mapping() -> None:
    with pytest.raises(ValueError, match=r"^must be an object like \{'function': 'polynomial'"):
        StalenessConfig.from_dict([("a", 1)])  # type: ignore[arg-type]


def test_config_is_immutable() -> None:
    config = StalenessConfig()
    with pytest.raises(ValueError):
        config.a = 2.0  # type: ignore[misc]


def test_hinge_past_the_knee_and_zero_staleness() -> None:
    config = StalenessConfig(function="hinge", a=0.5, b=0)
    assert staleness_factor(config, 0) == 1.0
    assert staleness_factor(config, 1) == pytest.approx(1 / 1.5, rel=1e-12)
    assert staleness_factor(config, 10) == pytest.approx(1 / 6, rel=1e-12)
    assert staleness_factor(StalenessConfig(function="constant"), 0) == 1.0


def test_update_weight_defaults_to_the_example_count() -> None:
    config = StalenessConfig(function="hinge", a=1.0, b=0)
    assert update_weight(config, tau=1, num_examples=30) == pytest.approx(15.0, rel=1e-12)
    assert update_weight(config, tau=0, num_examples=30, weighting="equal") == 1.0
    assert isinstance(update_weight(config, tau=0, num_examples=30), float)
