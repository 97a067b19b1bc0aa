"""Loading local data from .npz files and entry points; the local evaluation split."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_agent.data import DataError, load_arrays, load_entry_point, split_local


def small_dataset():
    """An entry point target used below."""
    return np.arange(12, dtype=np.float64).reshape(6, 2), np.array([0, 1, 0, 1, 2, 2])


def test_npz_round_trip(tmp_path):
    path = tmp_path / "data.npz"
    X, y = small_dataset()
    np.savez(path, X=X, y=y)
    X2, y2 = load_arrays(str(path))
    assert X2.dtype == np.float32 and y2.dtype == np.int64
    np.testing.assert_allclose(X2, X)
    np.testing.assert_array_equal(y2, y)


def test_entry_point():
    X, y = load_arrays("tests.edge_agent.test_data:small_dataset")
    assert X.shape == (6, 2) and y.tolist() == [0, 1, 0, 1, 2, 2]


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, X=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_arrays(str(path))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((3, 2))}, "must hold arrays 'X' and 'y'"),
        ({"X": np.zeros((0, 2)), "y": np.zeros(0)}, "non-empty"),
        ({"X": np.zeros((3, 2)), "y": np.zeros(2)}, r"shape \[3, \.\.\.\]"),
        ({"X": np.zeros((3, 2)), "y": np.array(["a", "b", "c"])}, "integer labels or float"),
        ({"X": np.full((3, 2), np.inf), "y": np.zeros(3)}, "NaN or Inf"),
        ({"X": np.zeros((3, 2)), "y": np.array([0.0, np.nan, 1.0])}, "y contains NaN"),
    ],
)
def test_malformed_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_arrays(str(path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.npz", "does not exist"),
        ("no_colon_here", "module:function"),
        ("not_a_module_xyz:f", "cannot import"),
        ("fedge.edge_agent.data:nothing", "no attribute"),
        ("fedge.edge_agent.data:DataError.args", "not callable"),
    ],
)
def test_bad_sources(spec, message):
    with pytest.raises(DataError, match=message):
        load_arrays(spec)


def test_load_entry_point_dotted_attribute():
    assert load_entry_point("fedge.edge_agent.data:LocalData.num_train") is not None


def test_split_local_holds_out_a_fraction_and_uses_everything():
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    data = split_local(X, y, eval_fraction=0.3, rng=np.random.default_rng(0))
    assert data.X_eval.shape == (3, 2) and data.num_train == 7
    assert sorted(np.concatenate([data.y_train, data.y_eval]).tolist()) == list(range(10))
    np.testing.assert_array_equal(data.X_train[:, 0] / 2, data.y_train)
    one = split_local(X[:1], y[:1], eval_fraction=0.5, rng=np.random.default_rng(0))
    assert one.num_train == 1 and one.X_eval.shape[0] == 0


def image_batches():
    """An entry point returning batches (as a DataLoader would)."""
    rng = np.random.default_rng(5)
    return ((rng.random((4, 1, 8, 8)), rng.integers(0, 10, 4)) for _ in range(3))


def test_images_keep_their_shape_and_flatten_on_request(tmp_path):
    path = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    X, y = rng.random((5, 1, 8, 8)), rng.integers(0, 10, 5)
    np.savez(path, X=X, y=y)
    X2, y2 = load_arrays(str(path))
    assert X2.shape == (5, 1, 8, 8) and X2.dtype == np.float32 and y2.dtype == np.int64
    flat, _ = load_arrays(str(path), flatten=True)
    np.testing.assert_array_equal(flat, X.astype(np.float32).reshape(5, 64))


def test_float_targets_are_kept_for_regression(tmp_path):
    path = tmp_path / "reg.npz"
    y = np.array([0.5, -1.25, 3.0])
    np.savez(path, X=np.zeros((3, 2)), y=y)
    _, y2 = load_arrays(str(path))
    assert y2.dtype == np.float32
    np.testing.assert_array_equal(y2, y.astype(np.float32))


def test_an_entry_point_may_return_batches():
    X, y = load_arrays("tests.edge_agent.test_data:image_batches")
    assert X.shape == (12, 1, 8, 8) and y.shape == (12,)
    want = image_batches()
    first_x, first_y = next(want)
    np.testing.assert_array_equal(X[:4], first_x.astype(np.float32))
    np.testing.assert_array_equal(y[:4], first_y)


def mixed_batches():
    return [(np.zeros((2, 3)), np.zeros(2, np.int64)), (np.zeros((2, 4)), np.zeros(2, np.int64))]


def not_batches():
    return [1, 2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.edge_agent.test_data:mixed_batches", "different shapes"),
        ("tests.edge_agent.test_data:not_batches", "batch 0 is not a pair"),
    ],
)
def test_bad_batches(spec, message):
    with pytest.raises(DataError, match=message):
        load_arrays(spec)
