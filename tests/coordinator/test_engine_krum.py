"""Multi-Krum (``aggregation.robust: "multi_krum"``) on hand-built sparse decoded updates: the
selection against a dense reference, sign-flipped updates rejected and honest ones kept, the
weighted mean at ``f = 0``, weights in the mean but not in the selection, aggregations smaller
than ``2f + 3``, bounded memory, and the config's consistency checks."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.coordinator.engine import robust
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import DecodedUpdate
from fedge.shared.wire_update import DecodedTensor
from tests.coordinator.test_engine_robust import (
    SPEC,
    dense_matrix,
    flat,
    source_of,
    sparse_update,
)


def reference_scores(matrix: np.ndarray, f: int) -> np.ndarray:
    """Krum's scores by the definition, one update at a time: the sum of the ``n - f - 2``
    smallest squared distances to the other updates."""
    n = matrix.shape[0]
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((matrix[i] - matrix[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: max(1, n - f - 2)]))
    return np.asarray(scores)


def update_from(
    flat_values: np.ndarray, spec: ModelSpec, density: float, rng: np.random.Generator
) -> DecodedUpdate:
    """A decoded update carrying a random ``density`` share of ``flat_values``."""
    tensors = []
    start = 0
    for t in spec.tensors:
        size = math.prod(t.shape)
        values = flat_values[start : start + size].astype(np.float32)
        start += size
        keep = np.flatnonzero(rng.random(size) < density).astype(np.int64)
        tensors.append(DecodedTensor(t.name, tuple(t.shape), keep, values[keep]))
    return DecodedUpdate(
        task_id=1,
        base_version=0,
        num_examples=1,
        bits=32,
        chunk=1,
        topk_fraction=1.0,
        tensors=tensors,
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    f=st.integers(0, 5),
    select=st.one_of(st.none(), st.integers(1, 12)),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    bound=st.sampled_from([None, 1.0]),
    budget=st.sampled_from([48, 1000, 10**7]),
)
def test_multi_krum_matches_a_dense_reference(
    seed: int,
    n: int,
    f: int,
    select: int | None,
    density: float,
    bound: float | None,
    budget: int,
) -> None:
    """Gram matrix over coordinate ranges (tiny budgets split tensors), clipped updates,
    selection by distance, weighted mean of the selected: the same as computing it densely."""
    rng = np.random.default_rng(seed)
    updates = [sparse_update(SPEC, rng, density) for _ in range(n)]
    weights = list(rng.uniform(0.5, 3.0, n))
    got = robust.combine(
        source_of(updates, weights),
        count=n,
        spec=SPEC,
        method="multi_krum",
        bound=bound,
        krum_byzantine=f,
        krum_select=select,
        budget_bytes=budget,
    )
    matrix = dense_matrix(updates, SPEC) * np.asarray(got.scales)[:, None]
    f_eff, m = robust.krum_parameters(n, f, select)
    assert got.krum_byzantine == f_eff == max(0, min(f, (n - 3) // 2))
    keep = np.flatnonzero(~np.asarray(got.rejected, dtype=bool))
    assert len(keep) == (m if n > 2 else n) and got.num_rejected == n - len(keep)
    if n > 2 and len(keep) < n:
        # The selected are the lowest scores (up to rounding: many scores tie here, as
        # sparse updates with few or no values are equally far apart).
        scores = reference_scores(matrix, f_eff)
        rejected = np.delete(np.arange(n), keep)
        tol = 1e-9 * (1.0 + float(scores.max()))
        assert scores[keep].max() <= scores[rejected].min() + tol
    w = np.asarray(weights)[keep]
    want = w @ matrix[keep] / w.sum() if n else np.zeros(matrix.shape[1])
    np.testing.assert_allclose(flat(got.delta, SPEC), want, rtol=1e-9, atol=1e-12)
    assert got.total_weight == pytest.approx(float(w.sum()) if n else 0.0)
    assert [d.shape for d in got.delta.values()] == [tuple(t.shape) for t in SPEC.tensors]


@pytest.mark.parametrize("budget", [200, 10**7], ids=["ranges", "one-range"])
def test_sign_flipped_updates_are_rejected_and_honest_ones_kept(budget: int) -> None:
    """Seven honest sparse updates around a common direction, three boosted sign flips of
    honest-looking updates (the largest weight claims): all three are rejected, the result is
    the honest updates' weighted mean and points along the common direction."""
    rng = np.random.default_rng(21)
    size = sum(math.prod(t.shape) for t in SPEC.tensors)
    direction = rng.standard_normal(size)
    honest = [
        update_from(direction + 0.5 * rng.standard_normal(size), SPEC, 0.6, rng) for _ in range(7)
    ]
    flipped = [
        update_from(-4.0 * (direction + 0.5 * rng.standard_normal(size)), SPEC, 0.6, rng)
        for _ in range(3)
    ]
    updates = [honest[0], flipped[0], *honest[1:4], flipped[1], *honest[4:], flipped[2]]
    is_flipped = [any(u is x for x in flipped) for u in updates]
    weights = [1000.0 if b else float(i + 1) for i, b in enumerate(is_flipped)]
    got = robust.combine(
        source_of(updates, weights),
        count=10,
        spec=SPEC,
        method="multi_krum",
        krum_byzantine=3,
        budget_bytes=budget,
    )
    assert got.rejected == is_flipped
    matrix = dense_matrix(updates, SPEC)
    kept = [i for i, b in enumerate(is_flipped) if not b]
    w = np.asarray(weights)[kept]
    np.testing.assert_allclose(flat(got.delta, SPEC), w @ matrix[kept] / w.sum(), rtol=1e-9)
    assert got.total_weight == pytest.approx(float(w.sum()))
    assert float(flat(got.delta, SPEC) @ direction) > 0
    # The plain weighted mean is dragged backwards by the flips' weight claims.
    mean = robust.combine(source_of(updates, weights), count=10, spec=SPEC, method="mean")
    assert float(flat(mean.delta, SPEC) @ direction) < 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9), bound=st.sampled_from([None, 0.7]))
def test_with_f_0_and_every_update_selected_it_is_the_bounded_weighted_mean(
    seed: int, n: int, bound: float | None
) -> None:
    rng = np.random.default_rng(seed)
    updates = [sparse_update(SPEC, rng, 0.4) for _ in range(n)]
    weights = list(rng.uniform(0.1, 5.0, n))
    krum = robust.combine(
        source_of(updates, weights),
        count=n,
        spec=SPEC,
        method="multi_krum",
        bound=bound,
        krum_byzantine=0,
        budget_bytes=300,
    )
    mean = robust.combine(
        source_of(updates, weights), count=n, spec=SPEC, method="mean", bound=bound
    )
    assert krum.rejected == [False] * n
    np.testing.assert_allclose(
        flat(krum.delta, SPEC), flat(mean.delta, SPEC), rtol=1e-9, atol=1e-12
    )
    assert krum.total_weight == pytest.approx(mean.total_weight)
    assert (krum.norms, krum.scales) == (mean.norms, mean.scales)


def test_fewer_updates_than_2f_plus_3_use_the_largest_f_they_allow() -> None:
    assert robust.krum_parameters(20, 6, None) == (6, 14)
    assert robust.krum_parameters(20, 6, 10) == (6, 10)
    assert robust.krum_parameters(7, 3, None) == (2, 5)
    assert robust.krum_parameters(7, 3, 6) == (2, 5)
    assert robust.krum_parameters(4, 3, None) == (0, 4)
    assert robust.krum_parameters(1, 5, 3) == (0, 1)
    # Four updates with f = 3 configured: f = 0, all kept, the weighted mean.
    rng = np.random.default_rng(22)
    updates = [sparse_update(SPEC, rng, 0.5) for _ in range(3)]
    updates.append(sparse_update(SPEC, rng, 1.0, scale=100.0))
    weights = [1.0, 2.0, 3.0, 4.0]
    got = robust.combine(
        source_of(updates, weights), count=4, spec=SPEC, method="multi_krum", krum_byzantine=3
    )
    assert (got.krum_byzantine, got.rejected) == (0, [False] * 4)
    want = np.asarray(weights) @ dense_matrix(updates, SPEC) / sum(weights)
    np.testing.assert_allclose(flat(got.delta, SPEC), want, rtol=1e-6, atol=1e-7)
    # Seven with f = 3 configured: f = 2, five kept; the outlier is among the rejected.
    more = [sparse_update(SPEC, rng, 0.5) for _ in range(6)] + [updates[3]]
    got = robust.combine(
        source_of(more, [1.0] * 7), count=7, spec=SPEC, method="multi_krum", krum_byzantine=3
    )
    assert got.krum_byzantine == 2
    assert got.num_rejected == 2 and got.rejected[6]


def test_peak_memory_is_bounded_by_the_budget_not_the_update_count() -> None:
    """64 updates of one 60,000-value tensor (2 % carried, so the decoded updates are kept
    between the ranges; 30.7 MB as a dense stack), 1 MiB budget: the peak stays within two
    budgets plus a few tensor-sized float64 buffers (as for the coordinate-wise statistics,
    tests/coordinator/test_engine_robust.py)."""
    size, n, budget = 60_000, 64, 2**20
    spec = ModelSpec.from_dict([{"name": "w", "shape": [size]}])

    def source() -> Iterator[tuple[DecodedUpdate, float]]:
        rng = np.random.default_rng(5)  # the same updates on every pass
        for _ in range(n):
            yield sparse_update(spec, rng, 0.02), 1.0

    tracemalloc.start()
    try:
        got = robust.combine(
            source,
            count=n,
            spec=spec,
            method="multi_krum",
            krum_byzantine=10,
            budget_bytes=budget,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tensor_bytes = size * 8
    bound = 2 * budget + 6 * tensor_bytes
    assert bound < n * tensor_bytes / 4
    assert peak <= bound, f"peak {peak} B above {bound} B"
    assert got.num_rejected == 10 and got.delta["w"].shape == (size,)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"min_updates": 6, "krum_byzantine": 2}, r"needs at least 7 updates .* min_updates is 6"),
        (
            {"mode": "async", "buffer_size": 4, "krum_byzantine": 1},
            r"needs at least 5 updates .* buffer_size is 4",
        ),
        (
            {"min_updates": 10, "krum_byzantine": 3, "krum_select": 8},
            r"krum_select \(8\) must not exceed min_updates - krum_byzantine \(7\)",
        ),
        ({"min_updates": 10, "krum_byzantine": -1}, "krum_byzantine"),
        ({"min_updates": 10, "krum_select": 0}, "krum_select"),
    ],
)
def test_inconsistent_krum_settings_are_config_errors(
    values: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        AggregationConfig.from_dict({"clients_per_round": 20, "robust": "multi_krum", **values})


def test_consistent_krum_settings_parse() -> None:
    cfg = AggregationConfig.from_dict(
        {
            "clients_per_round": 20,
            "min_updates": 20,
            "robust": "multi_krum",
            "krum_byzantine": 8,
            "krum_select": 12,
        }
    )
    assert (cfg.krum_byzantine, cfg.krum_select) == (8, 12)
    # Only multi_krum checks them.
    assert AggregationConfig.from_dict({"krum_byzantine": 8}).robust == "mean"


def _selected(scores: np.ndarray, select: int) -> np.ndarray:
    """The ``select`` lowest scores, ties to the earlier update."""
    keep = np.zeros(scores.size, dtype=bool)
    keep[sorted(range(scores.size), key=lambda i: (scores[i], i))[:select]] = True
    return keep


@pytest.mark.parametrize(
    ("n", "f", "select", "scale"),
    [
        (40, 0, 10, 1.0),  # larger than numpy's small-array sorts: partition order matters
        (40, 7, 20, 1.0),
        (17, 3, 5, 1.0),
        (30, 5, 12, 0.01),  # every squared distance below 1
    ],
)
def test_krum_keep_matches_the_definition(n: int, f: int, select: int, scale: float) -> None:
    rng = np.random.default_rng(n + f)
    vectors = scale * rng.standard_normal((n, 6))
    keep = robust.krum_keep(vectors @ vectors.T, f, select)
    assert keep.dtype == bool
    np.testing.assert_array_equal(keep, _selected(reference_scores(vectors, f), select))


def test_krum_keep_of_three_updates_scores_one_neighbour() -> None:
    """n = 3, f = 0: one nearest neighbour each; points 0, 1, 10 score 1, 1, 81 (two
    neighbours would give 101, 82, 181 and select the second)."""
    points = np.array([[0.0], [1.0], [10.0]])
    keep = robust.krum_keep(points @ points.T, 0, 1)
    assert keep.tolist() == [True, False, False]


def test_krum_keep_breaks_ties_by_order() -> None:
    """Forty updates at two points: the scores tie within each group, and the first ten of
    the better group are kept (a sort that is not stable may pick others)."""
    pattern = [0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1]
    pattern += [1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0]
    vectors = np.array(pattern, dtype=np.float64)[:, None]
    scores = reference_scores(vectors, 0)
    keep = robust.krum_keep(vectors @ vectors.T, 0, 10)
    np.testing.assert_array_equal(keep, _selected(scores, 10))
    better = 1 if sum(pattern) > len(pattern) / 2 else 0
    assert [i for i in range(40) if keep[i]] == [i for i, p in enumerate(pattern) if p == better][
        :10
    ]


@pytest.mark.parametrize(
    ("method", "budget"),
    [
        ("trimmed_mean", robust.DEFAULT_BUDGET_BYTES),
        ("median", robust.DEFAULT_BUDGET_BYTES),
        ("multi_krum", robust.DEFAULT_BUDGET_BYTES),
        ("trimmed_mean", 2000),  # several coordinate ranges, the updates kept between them
        ("multi_krum", 2000),
    ],
)
def test_updates_that_fit_the_budget_are_read_once(method: str, budget: int) -> None:
    """The decoded updates are kept between the passes while they fit in the budget (module
    docstring): the source is read once."""
    rng = np.random.default_rng(9)
    updates = [sparse_update(SPEC, rng, 0.5) for _ in range(5)]
    calls: list[int] = []

    def source() -> Iterator[tuple[DecodedUpdate, float]]:
        calls.append(1)
        return zip(updates, [1.0] * 5, strict=True)

    got = robust.combine(source, count=5, spec=SPEC, method=method, budget_bytes=budget)
    assert len(calls) == 1
    assert [d.shape for d in got.delta.values()] == [tuple(t.shape) for t in SPEC.tensors]
