"""IID and Dirichlet partitions of a real dataset's labels."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_agent.sim.partition import dirichlet_partition, iid_partition, label_skew


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert joined.size == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def test_iid_sizes_are_balanced_and_cover_everything(labels):
    parts = iid_partition(labels.size, 20, np.random.default_rng(0))
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert_exact_cover(parts, labels.size)
    assert label_skew(labels, parts) < 0.2


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_dirichlet_uses_every_sample_once_and_respects_min_size(labels, alpha):
    parts = dirichlet_partition(labels, 20, alpha, np.random.default_rng(1), min_size=10)
    assert len(parts) == 20
    assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= 10


def test_skew_grows_as_alpha_shrinks(labels):
    def skew(alpha):
        values = [
            label_skew(labels, dirichlet_partition(labels, 20, alpha, np.random.default_rng(s)))
            for s in range(3)
        ]
        return float(np.mean(values))

    iid = label_skew(labels, iid_partition(labels.size, 20, np.random.default_rng(0)))
    assert skew(0.05) > skew(0.5) > skew(50.0)
    assert skew(0.05) > 0.6
    assert skew(50.0) < 0.1 + iid


def test_partitions_are_deterministic_for_a_seed(labels):
    a = dirichlet_partition(labels, 8, 0.3, np.random.default_rng(42))
    b = dirichlet_partition(labels, 8, 0.3, np.random.default_rng(42))
    c = dirichlet_partition(labels, 8, 0.3, np.random.default_rng(43))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(x.size != y.size or (x != y).any() for x, y in zip(a, c, strict=True))
    i1 = iid_partition(100, 3, np.random.default_rng(1))
    i2 = iid_partition(100, 3, np.random.default_rng(1))
    for x, y in zip(i1, i2, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid_partition(3, 4, np.random.default_rng(0)), "cannot give 4 devices"),
        (lambda: iid_partition(3, 0, np.random.default_rng(0)), "at least 1"),
        (lambda: dirichlet_partition(np.zeros(10), 2, 0.0, np.random.default_rng(0)), "alpha"),
        (
            lambda: dirichlet_partition(np.zeros(10), 3, 1.0, np.random.default_rng(0), min_size=4),
            "at least 4",
        ),
    ],
)
def test_impossible_requests_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
