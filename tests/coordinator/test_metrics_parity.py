"""Device metrics have one definition (fedge.shared.wiremetrics): a JSON report accepts exactly the
values an update's metrics block accepts."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from fedge.coordinator.schemas.device_work import DeviceMetrics
from fedge.shared.wiremetrics import METRIC_KEYS, encode_metrics

CASES = [
    {"num_eval_examples": 2**62 - 1},
    {"num_eval_examples": 2**62},
    {"num_eval_examples": -1},
    {"eval_accuracy": 1.0},
    {"eval_accuracy": math.nextafter(1.0, 2.0)},
    {"eval_accuracy": -0.0},
    {"train_time_s": 0.0},
    {"train_time_s": -1e-9},
    {"train_loss": 3.5e38},
    {"train_loss": -1.0},
    {"train_loss": math.inf},
    {"eval_loss": math.nan},
    {"train_loss": 0.5, "eval_loss": 0.7, "eval_accuracy": 0.9, "train_time_s": 1.5},
]


def _json_accepts(metrics: dict[str, float]) -> bool:
    try:
        DeviceMetrics.model_validate(metrics)
    except ValidationError:
        return False
    return True


def _wire_accepts(metrics: dict[str, float]) -> bool:
    try:
        encode_metrics(metrics)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("metrics", CASES, ids=repr)
def test_a_json_report_accepts_what_an_update_can_carry(metrics: dict[str, float]) -> None:
    assert _json_accepts(metrics) == _wire_accepts(metrics)


def test_the_report_names_the_metrics_an_update_carries() -> None:
    assert set(DeviceMetrics.model_fields) == METRIC_KEYS
