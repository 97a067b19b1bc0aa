from __future__ import annotations

import math

import pytest

from fedge.shared.policy import DENSE, CompressionPolicy, PolicyError


def test_defaults_and_round_trip() -> None:
    p = CompressionPolicy()
    assert (p.topk_fraction, p.bits, p.chunk, p.error_feedback, p.scope) == (
        0.01,
        4,
        256,
        True,
        "tensor",
    )
    assert CompressionPolicy.from_dict(p.to_dict()) == p
    q = CompressionPolicy(topk_fraction=0.5, bits=1, chunk=7, error_feedback=False, scope="global")
    assert CompressionPolicy.from_dict(q.to_dict()) == q
    assert DENSE.is_dense and not p.is_dense
    assert CompressionPolicy.from_dict({"bits": 8}) == CompressionPolicy(bits=8)


def test_integer_fraction_is_accepted_as_float() -> None:
    p = CompressionPolicy(topk_fraction=1)
    assert isinstance(p.topk_fraction, float)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"topk_fraction": -0.1}, "topk_fraction"),
        ({"topk_fraction": math.nan}, "topk_fraction"),
        ({"topk_fraction": math.inf}, "topk_fraction"),
        ({"topk_fraction": "0.1"}, "topk_fraction"),
        ({"topk_fraction": True}, "topk_fraction"),
        ({"bits": 3}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"chunk": 0}, "chunk"),
        ({"chunk": (1 << 20) + 1}, "chunk"),
        ({"chunk": "256"}, "chunk"),
        ({"error_feedback": 1}, "error_feedback"),
        ({"scope": "layer"}, "scope"),
        ({"topk": 0.1}, "unknown compression policy field"),
    ],
)
def test_invalid_fields_raise_policy_error_naming_the_field(
    fields: dict[str, object], field: str
) -> None:
    with pytest.raises(PolicyError, match=field):
        CompressionPolicy.from_dict(fields)


def test_policy_error_is_value_error_and_non_mapping_rejected() -> None:
    assert issubclass(PolicyError, ValueError)
    with pytest.raises(PolicyError, match="must be an object"):
        CompressionPolicy.from_dict([("bits", 4)])  # type: ignore[arg-type]
