from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.shared.compression import compress, decompress
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import DENSE, CompressionPolicy
from fedge.shared.topk import topk_count


def _delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((40, 40)).astype(np.float32),
        "b": rng.standard_normal(40).astype(np.float32),
    }


def test_dense_policy_is_lossless() -> None:
    delta = _delta(np.random.default_rng(0))
    out = decompress(compress(delta, DENSE, np.random.default_rng(1)))
    for name in delta:
        np.testing.assert_array_equal(out[name], delta[name])
        assert out[name] is not delta[name]


@pytest.mark.parametrize("bits", [32, 8])
def test_tensor_scope_keeps_the_largest_per_tensor(bits: int) -> None:
    rng = np.random.default_rng(2)
    delta = _delta(rng)
    delta["b"] *= 1000  # must not steal the budget of "w" in tensor scope
    c = compress(delta, CompressionPolicy(topk_fraction=0.05, bits=bits, chunk=8), rng)
    for t in c.tensors:
        k = topk_count(t.size, 0.05)
        assert t.indices is not None and t.indices.size == k
        flat = np.abs(delta[t.name].reshape(-1))
        assert flat[t.indices].min() >= np.delete(flat, t.indices).max()


def test_global_scope_spends_the_budget_where_the_mass_is() -> None:
    rng = np.random.default_rng(3)
    delta = _delta(rng)
    delta["b"] *= 1000
    policy = CompressionPolicy(topk_fraction=0.05, bits=32, scope="global")
    c = compress(delta, policy, rng)
    total = sum(a.size for a in delta.values())
    assert c.nnz == topk_count(total, 0.05)
    by_name = {t.name: t for t in c.tensors}
    assert by_name["b"].indices is None  # all 40 of the large values
    assert by_name["w"].nnz == topk_count(total, 0.05) - 40


def test_compress_does_not_touch_the_callers_arrays() -> None:
    rng = np.random.default_rng(4)
    delta = _delta(rng)
    before = {k: v.copy() for k, v in delta.items()}
    residual = Residual.zeros(ModelSpec.from_weights(delta))
    for policy in (DENSE, CompressionPolicy(topk_fraction=1.0, bits=4)):
        compress(delta, policy, rng)
    compress(delta, CompressionPolicy(topk_fraction=1.0, bits=32), rng, residual)
    for k in delta:
        np.testing.assert_array_equal(delta[k], before[k])


def test_float64_and_float16_inputs_are_converted() -> None:
    rng = np.random.default_rng(5)
    delta: dict[str, np.ndarray] = {
        "a": rng.standard_normal(10),
        "b": rng.standard_normal(3).astype(np.float16),
    }
    out = decompress(compress(delta, DENSE, rng))
    np.testing.assert_array_equal(out["a"], delta["a"].astype(np.float32))
    assert out["b"].dtype == np.float32


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"w": np.array([1.0, np.nan], np.float32)}, "NaN"),
        ({"w": np.array([1.0, np.inf], np.float32)}, "NaN or infinite"),
        ({"w": np.array([1e300])}, "infinite"),
        ({"w": np.array([1, 2], np.int64)}, "floating dtype"),
        ({"w": np.array([1 + 2j])}, "floating dtype"),
        ({"w": [1.0]}, "numpy array"),
        ({}, "non-empty"),
    ],
)
def test_invalid_input_rejected(delta: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compress(delta, CompressionPolicy(), np.random.default_rng(0))  # type: ignore[arg-type]


def test_invalid_input_leaves_the_residual_untouched() -> None:
    spec = ModelSpec.from_dict([{"name": "w", "shape": [3]}])
    residual = Residual({"w": np.array([1.0, 2.0, 3.0], np.float32)})
    for bad in ({"w": np.array([1.0, np.nan, 0.0], np.float32)}, {"w": np.ones(4, np.float32)}):
        with pytest.raises(ValueError):
            compress(bad, CompressionPolicy(), np.random.default_rng(0), residual)
        np.testing.assert_array_equal(residual.values["w"], [1.0, 2.0, 3.0])
    big = {"w": np.full(3, 3e38, np.float32)}
    residual.values["w"][:] = 3e38
    with pytest.raises(ValueError, match="overflows"):
        compress(big, CompressionPolicy(), np.random.default_rng(0), residual)
    assert residual.spec == spec


def test_residual_requires_error_feedback_policy() -> None:
    delta = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="disables error feedback"):
        compress(
            delta, DENSE, np.random.default_rng(0), Residual.zeros(ModelSpec.from_weights(delta))
        )


def _run(
    policy: CompressionPolicy, *, feedback: bool, steps: int, seed: int = 17
) -> tuple[list[float], Residual | None]:
    """Gap ||sum(true deltas) - sum(decoded updates)|| after each step."""
    rng = np.random.default_rng(seed)
    spec = ModelSpec.from_dict([{"name": "w", "shape": [50, 30]}, {"name": "b", "shape": [500]}])
    residual = Residual.zeros(spec) if feedback else None
    true_sum = {t.name: np.zeros(t.shape) for t in spec.tensors}
    sent_sum = {t.name: np.zeros(t.shape) for t in spec.tensors}
    gaps = []
    for _ in range(steps):
        delta = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
        decoded = decompress(compress(delta, policy, rng, residual))
        for name in delta:
            true_sum[name] += delta[name]
            sent_sum[name] += decoded[name]
        gap = {name: true_sum[name] - sent_sum[name] for name in delta}
        if residual is not None:
            # Error feedback keeps exactly what was not sent: gap == residual.
            for name in delta:
                np.testing.assert_allclose(gap[name], residual.values[name], atol=2e-3)
        gaps.append(math.sqrt(sum(float((g**2).sum()) for g in gap.values())))
    return gaps, residual


@pytest.mark.parametrize("bits", [32, 4])
def test_error_feedback_keeps_the_gap_bounded(bits: int) -> None:
    """T = 200 steps of N(0, 1) deltas (d = 2000) with top-2 %.

    With error feedback the gap between the sums of true and decoded deltas equals the
    residual and stops growing after a short warm-up; without it top-k loses mass every step
    and the gap grows like sqrt(T).
    """
    T = 200
    ef_policy = CompressionPolicy(topk_fraction=0.02, bits=bits, chunk=64, error_feedback=True)
    no_ef_policy = CompressionPolicy(topk_fraction=0.02, bits=bits, chunk=64, error_feedback=False)
    ef, residual = _run(ef_policy, feedback=True, steps=T)
    no_ef, _ = _run(no_ef_policy, feedback=False, steps=T)
    assert residual is not None
    assert ef[-1] == pytest.approx(residual.norm(), rel=1e-4)
    # Bounded: the second half never exceeds the level already reached in [T/10, T/2].
    assert max(ef[T // 2 :]) <= 1.25 * max(ef[T // 10 : T // 2])
    # Deterministic top-k bound ||r|| <= sqrt(1-delta)/(1-sqrt(1-delta)) * max||delta_t||,
    # delta = k/d, independent of T (holds exactly without quantization).
    if bits == 32:
        c = math.sqrt(1 - 0.02)
        assert max(ef) <= c / (1 - c) * math.sqrt(2000) * 1.2
    # Without feedback the gap keeps growing (about sqrt(4) = 2x from T/4 to T) ...
    assert no_ef[-1] >= 1.6 * no_ef[T // 4 - 1]
    # ... and ends far above the error-feedback gap.
    assert no_ef[-1] >= 3 * ef[-1]
