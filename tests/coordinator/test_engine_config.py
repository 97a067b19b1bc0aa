"""Parsing a task's stored aggregation config."""

from __future__ import annotations

import pytest

from fedge.coordinator.engine.config import AggregationConfig, ConfigError


@pytest.mark.parametrize(
    ("cpr", "over", "expected"), [(10, 0.3, 13), (3, 0.0, 3), (4, 0.3, 6), (1, 1.0, 2)]
)
def test_num_selected_over_selects(cpr: int, over: float, expected: int) -> None:
    cfg = AggregationConfig.from_dict(
        {"clients_per_round": cpr, "over_selection": over, "min_updates": 1}
    )
    assert cfg.num_selected == expected


def test_defaults_and_flat_target() -> None:
    cfg = AggregationConfig.from_dict({"target_metric": "accuracy", "target_value": 0.9})
    assert (cfg.mode, cfg.strategy, cfg.clients_per_round) == ("sync", "fedavg", 10)
    assert (cfg.target_name, cfg.target_value) == ("accuracy", 0.9)
    nested = AggregationConfig.from_dict({"target_metric": {"name": "loss", "value": 0.2}})
    assert (nested.target_name, nested.target_value) == ("loss", 0.2)
    none = AggregationConfig.from_dict({"target_metric": None, "target_value": None})
    assert (none.target_metric, none.target_name, none.target_value) == (None, None, None)


def test_unknown_keys_of_another_version_are_ignored() -> None:
    assert AggregationConfig.from_dict({"num_rounds": 3, "future_key": 1}).num_rounds == 3


@pytest.mark.parametrize(
    "data",
    [
        {"mode": "batch"},
        {"round_deadline_s": -1},
        {"strategy": "fedprox"},
        {"staleness": {"function": "polynomial", "a": -2}},
        {"target_metric": "accuracy"},
        {"buffer_size": True},
        {"num_rounds": None},
        {"num_rounds": 5.0},
        {"over_selection": "0.3"},
        {"lease_s": 0.01},
        {"staleness": {"function": "hinge", "b": 1.5}},
        {"staleness": {"c": 1}},
    ],
)
def test_invalid_configs_name_the_field(data: dict) -> None:
    key = next(iter(data))
    with pytest.raises(ConfigError, match=f"aggregation.{key}"):
        AggregationConfig.from_dict(data)


def test_inconsistent_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"min_updates \(3\) must not exceed"):
        AggregationConfig.from_dict({"clients_per_round": 2, "min_updates": 3})


@pytest.mark.parametrize("data", [None, [], "sync"])
def test_a_config_that_is_no_object_is_a_config_error(data: object) -> None:
    with pytest.raises(ConfigError, match="must be an object"):
        AggregationConfig.from_dict(data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"selection_seed": -1}, "aggregation.selection_seed"),
        ({"selection_seed": 2**63}, "aggregation.selection_seed"),
        ({"selection_seed": 1.0}, "aggregation.selection_seed"),
        ({"selection_seed": "7"}, "aggregation.selection_seed"),
        (
            {"selection_seed": 3, "mode": "async", "clients_per_round": 1},
            "selection_seed applies to sync rounds only",
        ),
        (
            {
                "selection_seed": 3,
                "weighting": "equal",
                "max_staleness": 0,
                "privacy": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0},
            },
            "selection_seed must be null",
        ),
    ],
)
def test_a_selection_seed_is_checked(data: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        AggregationConfig.from_dict(data)


def test_selection_seed_defaults_to_none_and_takes_any_63_bit_integer() -> None:
    assert AggregationConfig.from_dict({}).selection_seed is None
    for seed in (0, 12345, 2**63 - 1):
        assert AggregationConfig.from_dict({"selection_seed": seed}).selection_seed == seed
