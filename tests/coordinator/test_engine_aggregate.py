"""Streaming aggregation: weighted means, sparse == dense, partial sums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.blobstore import BlobStore, FileBlobStore
from fedge.coordinator.engine.aggregate import (
    Accumulator,
    BadStoredUpdate,
    WeightedBlob,
    aggregate_blobs,
)
from fedge.shared.compression import compress, decompress
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import DENSE, CompressionPolicy
from fedge.shared.wire import encode_update

SPEC = ModelSpec.from_dict([{"name": "W", "shape": [20, 5]}, {"name": "b", "shape": [5]}])


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return FileBlobStore(tmp_path / "blobs")


def _store(blobs: BlobStore, delta: dict[str, np.ndarray], policy: CompressionPolicy, seed: int):
    c = compress(delta, policy, np.random.default_rng(seed))
    digest = blobs.put(encode_update(c, task_id=1, base_version=0, num_examples=10))
    return digest, c


def _random_delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}


def test_weighted_average_equals_hand_computed(blobs: BlobStore) -> None:
    spec = ModelSpec.from_dict([{"name": "w", "shape": [2]}])
    d1, _ = _store(blobs, {"w": np.array([1.0, 2.0], np.float32)}, DENSE, 0)
    d2, _ = _store(blobs, {"w": np.array([5.0, 6.0], np.float32)}, DENSE, 0)
    acc = aggregate_blobs(
        blobs, [WeightedBlob(d1, 1.0), WeightedBlob(d2, 3.0)], spec=spec, policy=DENSE
    )
    assert acc.total_weight == 4.0
    assert acc.count == 2
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5]
    np.testing.assert_allclose(acc.mean()["w"], [4.0, 5.0])


@pytest.mark.parametrize(
    "policy",
    [
        CompressionPolicy(topk_fraction=0.1, bits=32, error_feedback=False),
        CompressionPolicy(topk_fraction=0.05, bits=4, chunk=8, error_feedback=False),
        CompressionPolicy(topk_fraction=0.2, bits=2, chunk=16, scope="global"),
    ],
)
def test_sparse_streaming_agrees_with_dense(blobs: BlobStore, policy: CompressionPolicy) -> None:
    rng = np.random.default_rng(7)
    items, dense = [], Accumulator(SPEC)
    for i, weight in enumerate([3.0, 0.5, 1.25, 2.0]):
        digest, c = _store(blobs, _random_delta(rng), policy, seed=i)
        items.append(WeightedBlob(digest, weight))
        dense.add_dense(decompress(c), weight)
    sparse = aggregate_blobs(blobs, items, spec=SPEC, policy=policy)
    assert sparse.total_weight == dense.total_weight
    got, want = sparse.mean(), dense.mean()
    for name in SPEC.names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)
    # The mean actually moves the model (not all-zero by accident).
    assert any(np.abs(got[n]).max() > 0 for n in SPEC.names)


def test_partial_sums_merge_to_the_whole(blobs: BlobStore) -> None:
    rng = np.random.default_rng(3)
    policy = CompressionPolicy(topk_fraction=0.1, bits=8, error_feedback=False)
    items = [
        WeightedBlob(_store(blobs, _random_delta(rng), policy, i)[0], 1.0 + i) for i in range(6)
    ]
    whole = aggregate_blobs(blobs, items, spec=SPEC, policy=policy)
    left = aggregate_blobs(blobs, items[:2], spec=SPEC, policy=policy)
    left.merge(aggregate_blobs(blobs, items[2:], spec=SPEC, policy=policy))
    assert left.count == whole.count == 6
    for name in SPEC.names:
        np.testing.assert_allclose(left.mean()[name], whole.mean()[name], rtol=1e-12)


def test_zero_total_weight_means_no_change() -> None:
    acc = Accumulator(SPEC)
    mean = acc.mean()
    assert all(not np.any(mean[n]) for n in SPEC.names)


def test_missing_blob_is_named(blobs: BlobStore) -> None:
    good, _ = _store(blobs, _random_delta(np.random.default_rng(0)), DENSE, 0)
    missing = "0" * 64
    with pytest.raises(BadStoredUpdate) as info:
        aggregate_blobs(
            blobs, [WeightedBlob(good, 1.0), WeightedBlob(missing, 1.0)], spec=SPEC, policy=DENSE
        )
    assert info.value.index == 1


def test_update_for_another_spec_is_refused(blobs: BlobStore) -> None:
    other = {"W": np.ones((20, 4), np.float32), "b": np.ones(5, np.float32)}
    digest, _ = _store(blobs, other, DENSE, 0)
    with pytest.raises(BadStoredUpdate, match="shape_mismatch"):
        aggregate_blobs(blobs, [WeightedBlob(digest, 1.0)], spec=SPEC, policy=DENSE)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_invalid_weights_are_refused(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        Accumulator(SPEC).add_dense({t.name: np.zeros(t.shape) for t in SPEC.tensors}, weight)
