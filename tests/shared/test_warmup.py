"""The top-k warm-up schedule and the coordinator's upload check that follows it, and the
policy fields of momentum-corrected error feedback."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedge.shared.compression import CompressedUpdate, compress, compress_round
from fedge.shared.policy import CompressionPolicy, PolicyError
from fedge.shared.topk import topk_count
from fedge.shared.warmup import WARMUP_START_FRACTION, topk_fraction_at
from fedge.shared.wire import decode_update, encode_update
from fedge.shared.wireerror import WireFormatError

SHAPES = {"w": (64, 128), "b": (128,), "v": (10,)}


def _delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _encode(c: CompressedUpdate, base_version: int) -> bytes:
    return encode_update(c, task_id=1, base_version=base_version, num_examples=5)


# --------------------------------------------------------------------------- policy fields


def test_new_fields_default_to_plain_error_feedback_and_round_trip() -> None:
    p = CompressionPolicy()
    assert (p.momentum, p.warmup_rounds, p.residual_decay) == (0.0, 0, 1.0)
    q = CompressionPolicy(momentum=0.9, warmup_rounds=4, residual_decay=0.5)
    assert CompressionPolicy.from_dict(q.to_dict()) == q
    assert isinstance(CompressionPolicy(residual_decay=1).residual_decay, float)
    assert isinstance(CompressionPolicy(momentum=0).momentum, float)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": math.nan}, "momentum"),
        ({"momentum": "0.9"}, "momentum"),
        ({"momentum": True}, "momentum"),
        ({"warmup_rounds": -1}, "warmup_rounds"),
        ({"warmup_rounds": 100_001}, "warmup_rounds"),
        ({"warmup_rounds": 2.0}, "warmup_rounds"),
        ({"warmup_rounds": True}, "warmup_rounds"),
        ({"residual_decay": 0.0}, "residual_decay"),
        ({"residual_decay": 1.5}, "residual_decay"),
        ({"residual_decay": math.inf}, "residual_decay"),
        ({"residual_decay": False}, "residual_decay"),
        ({"momentum": 0.5, "error_feedback": False}, "momentum needs error_feedback"),
        ({"residual_decay": 0.5, "error_feedback": False}, "residual_decay needs error_feedback"),
    ],
)
def test_invalid_feedback_fields_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        CompressionPolicy.from_dict(fields)


def test_warmup_without_error_feedback_is_allowed() -> None:
    p = CompressionPolicy(error_feedback=False, warmup_rounds=3)
    assert topk_fraction_at(p, 0) == WARMUP_START_FRACTION


# -------------------------------------------------------------------------------- schedule


def test_schedule_follows_deep_gradient_compression() -> None:
    """DGC's warm-up to 99.9 % sparsity over 4 epochs keeps 25 %, 6.25 %, 1.5625 %, 0.4 %, then
    0.1 % (about a quarter a step; the exponential schedule takes exactly 0.004 ** (1/4))."""
    p = CompressionPolicy(topk_fraction=0.001, warmup_rounds=4)
    got = [topk_fraction_at(p, v) for v in range(7)]
    dgc = [0.25, 0.0625, 0.015625, 0.004, 0.001, 0.001, 0.001]
    for g, want in zip(got, dgc, strict=True):
        assert g == pytest.approx(want, rel=0.02)
    assert got[-3:] == [0.001] * 3  # exactly the policy's fraction once the warm-up is over


@pytest.mark.parametrize("target", [0.001, 0.01, 0.02, 0.1, 0.2])
@pytest.mark.parametrize("rounds", [1, 3, 10])
def test_schedule_decreases_from_the_start_to_the_fraction(target: float, rounds: int) -> None:
    p = CompressionPolicy(topk_fraction=target, warmup_rounds=rounds)
    got = [topk_fraction_at(p, v) for v in range(rounds + 3)]
    assert got[0] == WARMUP_START_FRACTION
    assert all(a > b for a, b in itertools.pairwise(got[: rounds + 1]))
    assert got[rounds:] == [target] * 3
    for f in got:  # four significant digits: the same float on every platform
        assert f == float(f"{f:.4g}")


def test_no_warmup_or_a_large_fraction_keeps_the_fraction() -> None:
    assert {topk_fraction_at(CompressionPolicy(topk_fraction=0.03), v) for v in range(5)} == {0.03}
    wide = CompressionPolicy(topk_fraction=0.5, warmup_rounds=10)
    assert {topk_fraction_at(wide, v) for v in range(12)} == {0.5}


@pytest.mark.parametrize("bad", [-1, 1.0, True, None])
def test_schedule_needs_a_version(bad: object) -> None:
    with pytest.raises(ValueError, match="base_version"):
        topk_fraction_at(CompressionPolicy(), bad)


# ----------------------------------------------------------------------- the upload check


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_upload_check_accepts_the_warmup_fraction_of_the_base_version(scope: str) -> None:
    policy = CompressionPolicy(topk_fraction=0.01, bits=4, chunk=64, scope=scope, warmup_rounds=3)
    for version in range(5):
        f = topk_fraction_at(policy, version)
        c = compress_round(
            _delta(version), policy, np.random.default_rng(version), None, base_version=version
        )
        assert c.topk_fraction == f
        if scope == "tensor":
            assert [t.nnz for t in c.tensors] == [
                topk_count(math.prod(s), f) for s in SHAPES.values()
            ]
        else:
            assert c.nnz == topk_count(sum(math.prod(s) for s in SHAPES.values()), f)
        decoded = decode_update(_encode(c, version), policy=policy)
        assert decoded.nnz == c.nnz and decoded.topk_fraction == f
        # the same update claimed for the first version after the warm-up is refused
        if version < 3:
            with pytest.raises(WireFormatError) as err:
                decode_update(_encode(c, 3), policy=policy)
            assert err.value.code == "policy_mismatch"


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_upload_check_refuses_one_value_more_than_the_warmup_allows(scope: str) -> None:
    policy = CompressionPolicy(topk_fraction=0.01, bits=8, chunk=64, scope=scope, warmup_rounds=4)
    size = 64 * 128 if scope == "tensor" else sum(math.prod(s) for s in SHAPES.values())
    for version in range(4):
        allowed = topk_count(size, topk_fraction_at(policy, version))
        more = CompressionPolicy(
            topk_fraction=(allowed + 1) / size,
            bits=8,
            chunk=64,
            scope=scope,
            error_feedback=False,
        )
        c = compress(_delta(version), more, np.random.default_rng(0))
        nnz = c.tensors[0].nnz if scope == "tensor" else c.nnz
        assert nnz == allowed + 1
        with pytest.raises(WireFormatError) as err:
            decode_update(_encode(c, version), policy=policy)
        assert err.value.code == "policy_mismatch"
