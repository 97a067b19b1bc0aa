"""Parsing a task's stored aggregation config."""

from __future__ import annotations

import pytest

from coordinator.engine.config import AggregationConfig, ConfigError


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
    assert (cfg.target_metric, cfg.target_value) == ("accuracy", 0.9)
    nested = AggregationConfig.from_dict({"target_metric": {"name": "loss", "value": 0.2}})
    assert (nested.target_metric, nested.target_value) == ("loss", 0.2)


@pytest.mark.parametrize(
    "data",
    [
        {"mode": "batch"},
        {"clients_per_round": 2, "min_updates": 3},
        {"round_deadline_s": -1},
        {"strategy": "fedprox"},
        {"staleness": {"function": "polynomial", "a": -2}},
        {"target_metric": "accuracy"},
        {"buffer_size": True},
    ],
)
def test_invalid_configs_name_the_field(data: dict) -> None:
    with pytest.raises(ConfigError, match="aggregation"):
        AggregationConfig.from_dict(data)
