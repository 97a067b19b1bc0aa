from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.shared import topk
from fedge.shared.topk import top_k_indices, topk_count


@pytest.mark.parametrize(
    ("size", "fraction", "k"),
    [
        (0, 0.5, 0),
        (1, 0.001, 1),
        (1000, 0.0001, 1),  # at least one value
        (100, 0.07, 7),  # 0.07 * 100 is 7.000000000000001 in binary floating point
        (100, 0.071, 8),
        (1000, 0.01, 10),
        (10, 1.0, 10),
        (3, 0.5, 2),
        (10_000_000, 0.001, 10_000),
    ],
)
def test_topk_count(size: int, fraction: float, k: int) -> None:
    assert topk_count(size, fraction) == k


def _check_top_k(magnitude: np.ndarray, k: int) -> None:
    idx = top_k_indices(magnitude, k)
    assert idx.dtype == np.int64
    assert idx.size == min(k, magnitude.size)
    assert np.all(np.diff(idx) > 0)
    if 0 < idx.size < magnitude.size:
        rest = np.delete(magnitude, idx)
        assert magnitude[idx].min() >= rest.max()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 3000), frac=st.floats(0.0001, 1.0))
def test_top_k_matches_definition(seed: int, n: int, frac: float) -> None:
    rng = np.random.default_rng(seed)
    magnitude = np.abs(rng.standard_normal(n).astype(np.float32))
    # Coarse rounding creates many ties.
    if seed % 2:
        magnitude = np.round(magnitude, 1)
    _check_top_k(magnitude, topk_count(n, frac))


@pytest.mark.parametrize(
    "kind", ["normal", "ties", "hidden_from_sample", "all_equal", "increasing"]
)
@pytest.mark.parametrize("k", [1, 100, 20_000, 70_000])
def test_sampled_path_is_exact(kind: str, k: int) -> None:
    """Large inputs take the sampled-threshold path; the result must still be exact."""
    n = 300_000
    rng = np.random.default_rng(7)
    if kind == "normal":
        m = np.abs(rng.standard_normal(n)).astype(np.float32)
    elif kind == "ties":
        m = rng.integers(0, 4, n).astype(np.float32)
    elif kind == "hidden_from_sample":
        # Large values only at positions a stride-based sample never looks at.
        m = np.zeros(n, np.float32)
        m[1::4] = rng.random(n // 4, dtype=np.float32) + 10
    elif kind == "all_equal":
        m = np.ones(n, np.float32)
    else:
        m = np.arange(n, dtype=np.float32)
    _check_top_k(m, k)


@pytest.mark.parametrize("k", [50, 100, 150])
def test_sampled_threshold_too_high_falls_back_to_the_whole_array(k: int) -> None:
    """The strided sample sees only large values, so its threshold is above the k-th largest
    of the whole array: fewer than k entries reach it and the selection must run over all."""
    n = 300_000
    rng = np.random.default_rng(11)
    m = rng.random(n, dtype=np.float32)  # the k largest overall are among these ...
    stride = max(1, n // topk._SAMPLE_SIZE)
    m[::stride] = 0.0
    m[: stride * 200 : stride] = 10.0 + rng.random(200, dtype=np.float32)  # ... or these
    sampled = m[::stride]
    assert np.count_nonzero(sampled > 1.0) == 200
    # The sample's threshold (what _candidates computes) leaves fewer than k candidates.
    assert topk._candidates(m, k) is None
    idx = top_k_indices(m, k)
    _check_top_k(m, k)
    expected = np.sort(np.argsort(-m, kind="stable")[:k])
    np.testing.assert_array_equal(idx, expected)


def test_candidates_are_exactly_the_entries_above_the_sampled_threshold() -> None:
    n = 300_000
    m = np.abs(np.random.default_rng(3).standard_normal(n)).astype(np.float32)
    k = 1_000
    candidates = topk._candidates(m, k)
    assert candidates is not None
    assert k <= candidates.size <= n // 2
    threshold = m[candidates].min()
    np.testing.assert_array_equal(candidates, np.flatnonzero(m >= threshold))
    # The threshold is below the k-th largest value, and not far below (a small candidate set).
    assert threshold <= np.partition(m, n - k)[n - k]
    assert candidates.size < 4 * k


@pytest.mark.parametrize(("n", "k"), [(65_535, 10), (65_536, 16_385), (400_000, 10)])
def test_sampling_bounds(n: int, k: int) -> None:
    """Below the sample size, or for k above n/4, the selection needs no sample; either way the
    result is exact."""
    m = np.random.default_rng(n).random(n, dtype=np.float32)
    _check_top_k(m, k)
    np.testing.assert_array_equal(top_k_indices(m, k), np.sort(np.argpartition(m, n - k)[n - k :]))


@pytest.mark.parametrize("n", [10, 300_000])
def test_k_of_zero_or_less_selects_nothing(n: int) -> None:
    m = np.random.default_rng(n).random(n, dtype=np.float32)
    for k in (0, -1):
        idx = top_k_indices(m, k)
        assert idx.dtype == np.int64 and idx.size == 0
