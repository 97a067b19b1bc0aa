from __future__ import annotations

import numpy as np
import pytest

from fedge.shared.limits import Limits
from fedge.shared.modelspec import ModelSpec, TensorSpec

SPEC_DICT = [
    {"name": "w", "shape": [64, 10]},
    {"name": "b", "shape": [10]},
    {"name": "t", "shape": []},
]


def test_round_trip_and_properties() -> None:
    spec = ModelSpec.from_dict(SPEC_DICT)
    assert spec.to_dict() == SPEC_DICT
    assert spec.names == ("w", "b", "t")
    assert spec.num_params == 64 * 10 + 10 + 1
    assert spec.tensors[2] == TensorSpec("t", ())
    assert spec.tensors[2].size == 1
    assert TensorSpec("e", (3, 0)).size == 0


def test_from_weights_keeps_order_and_shapes() -> None:
    weights = {"b": np.zeros(3, np.float32), "a": np.zeros((2, 2), np.float32)}
    spec = ModelSpec.from_weights(weights)
    assert spec.names == ("b", "a")
    assert spec.tensors[1].shape == (2, 2)
    spec.check(weights)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "at least one tensor"),
        ("w", "must be a list"),
        ({"name": "w", "shape": [1]}, "must be a list"),
        ([{"name": "", "shape": [1]}], "non-empty string"),
        ([{"name": 3, "shape": [1]}], "non-empty string"),
        ([{"name": "w", "shape": [1]}, {"name": "w", "shape": [2]}], "duplicate tensor name 'w'"),
        ([{"name": "w", "shape": [3, -1]}], "dimension -1 is negative"),
        ([{"name": "w", "shape": [1.5]}], "not an integer"),
        ([{"name": "w", "shape": [True]}], "not an integer"),
        ([{"name": "w", "shape": "12"}], "shape must be a list"),
        ([{"name": "w"}], "needs both"),
        ([{"name": "w", "shape": [1], "dtype": "f32"}], "unknown keys"),
        (["w"], "must be an object"),
        ([{"name": "w" * 300, "shape": [1]}], "more than the limit"),
        ([{"name": "w", "shape": [1] * 9}], "9 dimensions"),
        ([{"name": "w", "shape": [1 << 20, 1 << 20]}], "elements, more than the limit"),
    ],
)
def test_from_dict_rejects_bad_input(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_dict(data)


def test_too_many_tensors() -> None:
    data = [{"name": f"t{i}", "shape": [1]} for i in range(5)]
    with pytest.raises(ValueError, match="5 tensors, more than the limit of 4"):
        ModelSpec.from_dict(data, limits=Limits(max_tensors=4))
    with pytest.raises(ValueError, match="parameters, more than the limit"):
        ModelSpec.from_dict(data, limits=Limits(max_total_elements=4))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"w": np.zeros((64, 10)), "b": np.zeros(10)}, r"missing \['t'\]"),
        ({"w": np.zeros((64, 10)), "t": np.zeros(()), "b": np.zeros(10)}, "ordered"),
        ({"w": np.zeros((10, 64)), "b": np.zeros(10), "t": np.zeros(())}, "has shape"),
        (
            {"w": np.zeros((64, 10)), "b": np.zeros(10), "t": np.zeros(()), "x": np.zeros(1)},
            "extra",
        ),
    ],
)
def test_check_rejects_mismatch(weights: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_dict(SPEC_DICT).check(weights)
