"""Robust aggregation and the norm bound, as functions (fedge.coordinator.engine.robust and
.bounds): trimmed mean and median on sparse updates against a dense numpy reference (missing
coordinates count as zero), clipping, bounded memory, the adaptive bound's quantile tracking.
The coordinator-level behaviour (upload refusal, counts in the API, sync and async) is in
test_norm_bound.py."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.coordinator.engine import bounds, robust
from fedge.coordinator.engine.bounds import AdaptiveNormBound, NormBoundConfig
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import DecodedUpdate
from fedge.shared.wire_update import DecodedTensor

SPEC = ModelSpec.from_dict(
    [{"name": "w", "shape": [7, 5]}, {"name": "b", "shape": [5]}, {"name": "v", "shape": [13]}]
)


def sparse_update(
    spec: ModelSpec, rng: np.random.Generator, density: float, scale: float = 1.0
) -> DecodedUpdate:
    """A decoded update carrying a random subset of each tensor's coordinates (some dense)."""
    tensors = []
    for t in spec.tensors:
        size = math.prod(t.shape)
        values = (scale * rng.standard_normal(size)).astype(np.float32)
        if density >= 1.0:
            tensors.append(DecodedTensor(t.name, tuple(t.shape), None, values))
            continue
        keep = np.flatnonzero(rng.random(size) < density).astype(np.int64)
        tensors.append(DecodedTensor(t.name, tuple(t.shape), keep, values[keep]))
    return DecodedUpdate(
        task_id=1, base_version=0, num_examples=1, bits=32, chunk=1, topk_fraction=1.0,
        tensors=tensors,
    )  # fmt: skip


def dense_matrix(updates: list[DecodedUpdate], spec: ModelSpec) -> np.ndarray:
    """(n, model size) float64: every update flattened in spec order, zeros where not sent."""
    rows = []
    for u in updates:
        dense = u.to_dense()
        rows.append(np.concatenate([dense[t.name].ravel() for t in spec.tensors]))
    return np.asarray(rows, dtype=np.float64)


def flat(delta: dict[str, np.ndarray], spec: ModelSpec) -> np.ndarray:
    return np.concatenate([delta[t.name].ravel() for t in spec.tensors])


def reference_trimmed(matrix: np.ndarray, weights: np.ndarray, trim: int) -> np.ndarray:
    """Per column: sort the rows by (value, row), drop ``trim`` at each end, weighted mean."""
    n, d = matrix.shape
    out = np.zeros(d)
    for j in range(d):
        order = sorted(range(n), key=lambda i: (matrix[i, j], i))[trim : n - trim]
        w = weights[order]
        out[j] = float(np.dot(matrix[order, j], w) / w.sum()) if w.sum() > 0 else 0.0
    return out


def source_of(updates: list[DecodedUpdate], weights: list[float]) -> robust.UpdateSource:
    return lambda: zip(updates, weights, strict=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    trim_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]),
    budget=st.sampled_from([48, 1000, 10**7]),
)
def test_trimmed_mean_and_median_match_a_dense_reference(
    seed: int, n: int, density: float, trim_fraction: float, budget: int
) -> None:
    rng = np.random.default_rng(seed)
    updates = [sparse_update(SPEC, rng, density) for _ in range(n)]
    if n > 2:  # ties: two updates with the same values
        updates[1] = updates[0]
    weights = list(rng.uniform(0.5, 3.0, n))
    matrix = dense_matrix(updates, SPEC)
    trim = robust.trimmed_count(n, trim_fraction)
    assert trim == min(math.floor(trim_fraction * n), (n - 1) // 2)

    got = robust.combine(
        source_of(updates, weights),
        count=n,
        spec=SPEC,
        method="trimmed_mean",
        trim_fraction=trim_fraction,
        budget_bytes=budget,
    )
    want = reference_trimmed(matrix, np.asarray(weights), trim)
    np.testing.assert_allclose(flat(got.delta, SPEC), want, rtol=1e-12, atol=1e-12)
    assert got.total_weight == pytest.approx(sum(weights))
    assert [d.shape for d in got.delta.values()] == [tuple(t.shape) for t in SPEC.tensors]

    med = robust.combine(
        source_of(updates, weights), count=n, spec=SPEC, method="median", budget_bytes=budget
    )
    np.testing.assert_allclose(flat(med.delta, SPEC), np.median(matrix, axis=0), rtol=1e-12)
    norms = np.linalg.norm(matrix, axis=1)
    np.testing.assert_allclose(med.norms, norms, rtol=1e-6)
    assert med.scales == [1.0] * n


def test_the_median_ignores_a_minority_of_huge_updates_and_trimming_drops_them() -> None:
    rng = np.random.default_rng(1)
    honest = [sparse_update(SPEC, rng, 0.5) for _ in range(8)]
    attackers = [sparse_update(SPEC, rng, 1.0, scale=1e30) for _ in range(2)]
    updates = honest + attackers
    weights = [1.0] * 8 + [1000.0] * 2  # a large weight claim does not save an outlier
    honest_matrix = dense_matrix(honest, SPEC)
    for method in ("median", "trimmed_mean"):
        got = robust.combine(
            source_of(updates, weights),
            count=10,
            spec=SPEC,
            method=method,
            trim_fraction=0.2,
        )
        values = flat(got.delta, SPEC)
        # Every coordinate stays within the honest updates' range.
        assert np.all(values <= honest_matrix.max(axis=0) + 1e-12)
        assert np.all(values >= honest_matrix.min(axis=0) - 1e-12)


@pytest.mark.parametrize("method", ["mean", "trimmed_mean", "median"])
@pytest.mark.parametrize("scale", [1e30, 1e4])
def test_clipping_bounds_the_combined_update(method: str, scale: float) -> None:
    rng = np.random.default_rng(2)
    updates = [sparse_update(SPEC, rng, 0.3) for _ in range(4)]
    updates.append(sparse_update(SPEC, rng, 1.0, scale=scale))
    bound = 0.5
    got = robust.combine(
        source_of(updates, [1.0, 2.0, 1.0, 1.0, 5.0]),
        count=5,
        spec=SPEC,
        method=method,
        trim_fraction=0.2,
        bound=bound,
    )
    assert np.linalg.norm(flat(got.delta, SPEC)) <= bound * (1 + 1e-9)
    clipped = [s < 1.0 for s in got.scales]
    norms = np.linalg.norm(dense_matrix(updates, SPEC), axis=1)
    assert clipped == list(norms > bound)
    assert got.num_clipped == sum(clipped) >= 1
    np.testing.assert_allclose(got.norms, norms, rtol=1e-6)
    # A clipped update enters with norm exactly the bound.
    for norm, s in zip(got.norms, got.scales, strict=True):
        assert min(norm, bound) == pytest.approx(norm * s, rel=1e-12)


def test_the_mean_without_a_bound_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(3)
    updates = [sparse_update(SPEC, rng, 0.4) for _ in range(5)]
    weights = [1.0, 2.0, 3.0, 0.5, 4.0]
    got = robust.combine(source_of(updates, weights), count=5, spec=SPEC, method="mean")
    want = np.asarray(weights) @ dense_matrix(updates, SPEC) / sum(weights)
    np.testing.assert_allclose(flat(got.delta, SPEC), want, rtol=1e-6, atol=1e-7)


def test_a_source_that_changes_its_count_is_an_error() -> None:
    rng = np.random.default_rng(4)
    updates = [sparse_update(SPEC, rng, 0.4) for _ in range(3)]
    with pytest.raises(RuntimeError, match="expected 4 updates"):
        robust.combine(source_of(updates, [1.0] * 3), count=4, spec=SPEC, method="median")


# ------------------------------------------------------------------------ memory


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_peak_memory_is_bounded_by_the_budget_and_the_tensor_not_the_update_count(
    method: str,
) -> None:
    """64 updates of one 60,000-value tensor (10 % carried): stacking them densely would take
    64 x 60,000 x 8 B = 30.7 MB. With a 1 MiB budget the peak stays within two budgets
    (working arrays, kept updates) plus a few tensor-sized float64 buffers (the result, one
    decoded update and its temporaries)."""
    size, n, budget = 60_000, 64, 2**20
    spec = ModelSpec.from_dict([{"name": "w", "shape": [size]}])

    def source() -> Iterator[tuple[DecodedUpdate, float]]:
        rng = np.random.default_rng(5)  # the same updates on every pass
        for _ in range(n):
            yield sparse_update(spec, rng, 0.1), 1.0

    tracemalloc.start()
    try:
        got = robust.combine(
            source, count=n, spec=spec, method=method, trim_fraction=0.1, budget_bytes=budget
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tensor_bytes = size * 8
    bound = 2 * budget + 6 * tensor_bytes
    assert bound < n * tensor_bytes / 4  # the bound is meaningful: far below a dense stack
    assert peak <= bound, f"peak {peak} B above {bound} B"
    assert got.delta["w"].shape == (size,)


# ------------------------------------------------------------------------ bounds


def test_update_norm_is_exact_in_float64_for_values_whose_squares_overflow_float32() -> None:
    rng = np.random.default_rng(6)
    u = sparse_update(SPEC, rng, 0.5, scale=1e30)
    want = float(np.linalg.norm(dense_matrix([u], SPEC)[0]))
    assert math.isfinite(want)
    assert bounds.update_norm(u) == pytest.approx(want, rel=1e-12)
    assert bounds.clip_scale(10.0, 5.0) == 0.5
    assert bounds.clip_scale(4.0, 5.0) == 1.0
    assert bounds.clip_scale(1e300, None) == 1.0


def test_adaptive_bound_moves_towards_the_quantile_of_the_norms() -> None:
    config = NormBoundConfig(
        max_norm=1e6, adaptive=AdaptiveNormBound(quantile=0.8, lr=0.2, initial=0.01)
    )
    rng = np.random.default_rng(7)
    target = float(np.exp(0.5 * 0.8416))  # the 0.8 quantile of lognormal(0, 0.5)
    bound: float | None = bounds.current_bound(config, None)
    assert bound == 0.01
    history = []
    for _ in range(400):
        norms = list(rng.lognormal(0.0, 0.5, size=50))
        bound = bounds.adapt(config, bound, norms)
        assert bound is not None
        history.append(bound)
    # It climbs from far below, then hovers around the quantile.
    assert history[0] > 0.01
    settled = np.asarray(history[200:])
    assert abs(float(np.median(settled)) - target) < 0.15 * target
    # From far above it comes down, and never above max_norm.
    high = bounds.adapt(config, 1e6, [1.0] * 10)
    assert high is not None and high < 1e6
    assert bounds.adapt(config, 1e6, [1e9] * 10) == 1e6


def test_adapt_and_current_bound_without_adaptive() -> None:
    fixed = NormBoundConfig(max_norm=3.0)
    assert bounds.current_bound(fixed, 123.0) == 3.0  # a stored value only counts if adaptive
    assert bounds.adapt(fixed, 3.0, [1.0]) is None
    assert bounds.current_bound(None, None) is None
    adaptive = NormBoundConfig(max_norm=3.0, adaptive=AdaptiveNormBound())
    assert bounds.current_bound(adaptive, None) == 3.0
    assert bounds.current_bound(adaptive, 2.0) == 2.0
    assert bounds.current_bound(adaptive, 50.0) == 3.0


def test_norm_bound_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="needs action 'clip'"):
        NormBoundConfig(max_norm=1.0, action="refuse", adaptive=AdaptiveNormBound())
    with pytest.raises(ValueError, match="must not exceed max_norm"):
        NormBoundConfig(max_norm=1.0, adaptive=AdaptiveNormBound(initial=2.0))
    with pytest.raises(ValueError):
        NormBoundConfig(max_norm=0.0)


# ------------------------------------------------------------------------ errors


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        robust.combine(lambda: iter(()), count=0, spec=SPEC, method="mode")
    assert str(err.value) == (
        "unknown robust aggregation 'mode'; use one of "
        "('mean', 'trimmed_mean', 'median', 'multi_krum')"
    )


@pytest.mark.parametrize("method", ["trimmed_mean", "median", "multi_krum"])
@pytest.mark.parametrize(("count", "message"), [(2, "got more"), (4, "got 3")])
def test_a_source_with_another_count_is_an_error(method: str, count: int, message: str) -> None:
    rng = np.random.default_rng(7)
    updates = [sparse_update(SPEC, rng, 0.4) for _ in range(3)]
    with pytest.raises(RuntimeError) as err:
        robust.combine(source_of(updates, [1.0] * 3), count=count, spec=SPEC, method=method)
    assert str(err.value) == f"expected {count} updates to combine, {message}"


@pytest.mark.parametrize(("last", "message"), [(4, "got more"), (2, "got 2")])
def test_multi_krum_checks_the_count_of_its_averaging_pass(last: int, message: str) -> None:
    """A budget too small to keep the decoded updates: every pass reads the source again. A
    source that changes its count only on its last pass (the average of the selected
    updates) is refused too."""
    rng = np.random.default_rng(8)
    updates = [sparse_update(SPEC, rng, 0.5) for _ in range(4)]
    calls: list[int] = []

    def counting() -> Iterator[tuple[DecodedUpdate, float]]:
        calls.append(3)
        return zip(updates[:3], [1.0] * 3, strict=True)

    options = {"count": 3, "spec": SPEC, "method": "multi_krum", "budget_bytes": 500}
    robust.combine(counting, **options)  # type: ignore[arg-type]
    passes = len(calls)
    assert passes > 2  # several ranges, then the average

    def changing() -> Iterator[tuple[DecodedUpdate, float]]:
        calls.append(1)
        k = last if len(calls) - passes == passes else 3
        return zip(updates[:k], [1.0] * k, strict=True)

    with pytest.raises(RuntimeError) as err:
        robust.combine(changing, **options)  # type: ignore[arg-type]
    assert str(err.value) == f"expected 3 updates to combine, {message}"
    assert len(calls) - passes == passes


@pytest.mark.parametrize(
    ("n", "fraction", "trim"),
    [(100, 0.29, 29), (10, 0.3, 3), (10, 0.45, 4), (10, 0.5, 4), (2, 0.45, 0), (0, 0.2, 0)],
)
def test_trimmed_count(n: int, fraction: float, trim: int) -> None:
    """floor(fraction * n) (0.29 * 100 is 28.999999999999996 in floats: 29 meant), at most
    (n - 1) // 2 so that one value is left."""
    assert robust.trimmed_count(n, fraction) == trim


def test_reduce_median_returns_float64_for_any_float_matrix() -> None:
    matrix = np.array([[1.0, 4.0], [3.0, -2.0], [2.0, 0.5], [10.0, 0.25]], dtype=np.float32)
    want = [2.5, 0.375]  # the means of the two middle values of each column
    got = robust.reduce_median(matrix.copy())
    assert got.dtype == np.float64 and got.tolist() == want


def test_reduce_trimmed_gives_zero_where_the_kept_weights_sum_to_zero() -> None:
    """Three updates, weights 0, 0 and 5, one value trimmed at each end: a column whose
    middle value is the weighted update's gives that value, the others 0 (not NaN)."""
    matrix = np.array([[1.0, 2.0, 9.0, 5.0], [3.0, 8.0, 1.0, 4.0], [2.0, 5.0, 4.0, 6.0]])
    weights = np.array([0.0, 0.0, 5.0])
    for _ in range(3):  # freed arrays full of another value, for the result to land on
        junk = np.full(4, 7.0)
        del junk
        got = robust.reduce_trimmed(matrix.copy(), weights, 1)
        assert got.tolist() == [2.0, 5.0, 4.0, 0.0]


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_clipped_values_are_scaled_in_float64(method: str) -> None:
    """One dense update clipped to half its norm: every coordinate is its float32 value times
    the clip factor, formed in float64 (rounding the product to float32 would differ)."""
    rng = np.random.default_rng(10)
    u = sparse_update(SPEC, rng, 1.0)
    values = dense_matrix([u], SPEC)[0]
    bound = float(np.linalg.norm(values)) / 2
    got = robust.combine(source_of([u], [1.0]), count=1, spec=SPEC, method=method, bound=bound)
    (scale,) = got.scales
    assert scale == pytest.approx(0.5, rel=1e-6)
    want = values * scale
    assert np.any(want.astype(np.float32).astype(np.float64) != want)
    np.testing.assert_array_equal(flat(got.delta, SPEC), want)


def test_dense_updates_that_exactly_fit_the_budget_are_read_once() -> None:
    """Two dense updates of 53 float32 values carry 424 bytes: with a budget of 424 bytes
    (several coordinate ranges) they are kept, and the source is read once."""
    rng = np.random.default_rng(11)
    updates = [sparse_update(SPEC, rng, 1.0) for _ in range(2)]
    calls: list[int] = []

    def source() -> Iterator[tuple[DecodedUpdate, float]]:
        calls.append(1)
        return zip(updates, [1.0, 2.0], strict=True)

    got = robust.combine(source, count=2, spec=SPEC, method="trimmed_mean", budget_bytes=424)
    assert len(calls) == 1
    want = (dense_matrix(updates, SPEC) * [[1.0], [2.0]]).sum(axis=0) / 3.0
    np.testing.assert_allclose(flat(got.delta, SPEC), want, rtol=1e-12)


@pytest.mark.parametrize("method", ["trimmed_mean", "median", "multi_krum"])
def test_no_updates_combine_to_a_zero_delta(method: str) -> None:
    got = robust.combine(lambda: iter(()), count=0, spec=SPEC, method=method)
    assert {name: d.shape for name, d in got.delta.items()} == {
        t.name: tuple(t.shape) for t in SPEC.tensors
    }
    assert all(not d.any() for d in got.delta.values())
    assert (got.total_weight, got.norms, got.scales, got.rejected) == (0.0, [], [], [])
    assert got.num_clipped == 0 and got.num_rejected == 0


def test_trimmed_mean_trims_nothing_by_default() -> None:
    rng = np.random.default_rng(12)
    updates = [sparse_update(SPEC, rng, 0.6) for _ in range(5)]
    weights = [1.0, 2.0, 3.0, 0.5, 4.0]
    got = robust.combine(source_of(updates, weights), count=5, spec=SPEC, method="trimmed_mean")
    want = np.asarray(weights) @ dense_matrix(updates, SPEC) / sum(weights)
    np.testing.assert_allclose(flat(got.delta, SPEC), want, rtol=1e-12, atol=1e-15)


def test_multi_krum_assumes_no_byzantine_update_by_default() -> None:
    rng = np.random.default_rng(13)
    updates = [sparse_update(SPEC, rng, 0.6) for _ in range(6)]
    got = robust.combine(source_of(updates, [1.0] * 6), count=6, spec=SPEC, method="multi_krum")
    assert (got.krum_byzantine, got.rejected) == (0, [False] * 6)
