"""The streaming sum's parts: updates decoded at upload taken from the decoded cache (once,
for the same spec and policy, never under other limits), the policy and limits every stored
update is decoded under, the errors that name a bad blob, and the accumulator's weights,
scale, count and mean."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.blobstore import BlobStore, FileBlobStore
from fedge.coordinator.engine.aggregate import (
    Accumulator,
    BadStoredUpdate,
    WeightedBlob,
    aggregate_blobs,
    iter_decoded,
    max_abs,
)
from fedge.coordinator.engine.decodedcache import DecodedCache
from fedge.shared.compression import compress
from fedge.shared.limits import Limits
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import DENSE, CompressionPolicy
from fedge.shared.wire import DecodedUpdate, decode_update, encode_update

SPEC = ModelSpec.from_dict([{"name": "W", "shape": [6, 5]}, {"name": "b", "shape": [5]}])
SPARSE = CompressionPolicy(topk_fraction=0.5, bits=32, error_feedback=False)


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return FileBlobStore(tmp_path / "blobs")


def _delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}


def _encoded(delta: dict[str, np.ndarray], policy: CompressionPolicy, seed: int = 0) -> bytes:
    return encode_update(
        compress(delta, policy, np.random.default_rng(seed)),
        task_id=1,
        base_version=0,
        num_examples=10,
    )


def _decoded(delta: dict[str, np.ndarray], policy: CompressionPolicy) -> DecodedUpdate:
    """``delta`` compressed, encoded and decoded again, as an upload is."""
    return decode_update(_encoded(delta, policy), spec=SPEC, policy=policy)


def _put(blobs: BlobStore, seed: int, policy: CompressionPolicy = SPARSE) -> tuple[str, bytes]:
    data = _encoded(_delta(seed), policy, seed)
    return blobs.put(data), data


def _cached(
    blobs: BlobStore, seeds: list[int], policy: CompressionPolicy = SPARSE
) -> tuple[list[str], DecodedCache, dict[str, np.ndarray]]:
    """Blobs for ``seeds``, each also in a decoded cache (as an upload leaves it), and the sum
    of their dense deltas."""
    cache = DecodedCache(10_000_000)
    digests = []
    total = {t.name: np.zeros(t.shape) for t in SPEC.tensors}
    for seed in seeds:
        digest, data = _put(blobs, seed, policy)
        update = decode_update(data, spec=SPEC, policy=policy)
        cache.put(digest, update, spec=SPEC, policy=policy)
        update.add_to(total, 1.0)
        digests.append(digest)
    return digests, cache, total


def _sum(acc: Accumulator) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in acc.sums.items()}


def test_cached_updates_are_taken_once_and_their_blobs_not_read(blobs: BlobStore) -> None:
    """Every cached update is taken from memory (their blobs deleted: never read) and summed;
    the cache is empty afterwards, and the blob store stays the record."""
    digests, cache, total = _cached(blobs, [1, 2, 3])
    for digest in digests:
        assert blobs.delete(digest)
    items = [WeightedBlob(d, 1.0) for d in digests]
    acc = aggregate_blobs(blobs, items, spec=SPEC, policy=SPARSE, decoded=cache)
    for name, want in total.items():
        np.testing.assert_array_equal(acc.sums[name], want)
    assert (acc.count, len(cache), cache.hits, cache.misses) == (3, 0, 3, 0)
    with pytest.raises(BadStoredUpdate) as err:
        aggregate_blobs(blobs, items, spec=SPEC, policy=SPARSE, decoded=cache)
    assert (err.value.index, err.value.digest, err.value.detail) == (
        0,
        digests[0],
        "missing from the blob store",
    )
    assert str(err.value) == f"update blob {digests[0][:12]}: missing from the blob store"


def test_an_entry_for_another_spec_or_policy_is_not_used(blobs: BlobStore) -> None:
    """An entry decoded against another spec or policy is dropped, and the blob is decoded."""
    other_spec = ModelSpec.from_dict([{"name": "W", "shape": [30]}, {"name": "b", "shape": [5]}])
    for spec, policy in ((other_spec, SPARSE), (SPEC, DENSE)):
        digest, data = _put(blobs, 4)
        update = decode_update(data, spec=SPEC, policy=SPARSE)
        cache = DecodedCache(10_000_000)
        cache.put(digest, update, spec=spec, policy=policy)
        blobs.delete(digest)
        with pytest.raises(BadStoredUpdate, match="missing from the blob store"):
            list(
                iter_decoded(
                    blobs, [WeightedBlob(digest, 1.0)], spec=SPEC, policy=SPARSE, decoded=cache
                )
            )
        assert (cache.hits, cache.misses, len(cache)) == (0, 1, 0)


def test_under_other_limits_the_cache_is_not_consulted(blobs: BlobStore) -> None:
    """Entries were decoded under the default limits: a computation under tighter ones decodes
    every blob under them (and refuses what exceeds them) and leaves the cache alone."""
    digests, cache, _ = _cached(blobs, [5, 6])
    items = [WeightedBlob(d, 1.0) for d in digests]
    with pytest.raises(BadStoredUpdate) as err:
        aggregate_blobs(
            blobs,
            items,
            spec=SPEC,
            policy=SPARSE,
            limits=Limits(max_total_elements=34),
            decoded=cache,
        )
    assert err.value.index == 0 and "34" in err.value.detail
    assert (len(cache), cache.hits, cache.misses) == (2, 0, 0)


def test_stored_updates_are_decoded_under_the_given_policy(blobs: BlobStore) -> None:
    """A stored update of another compression than the task's is refused naming its place;
    without a policy (``None``) it is not checked."""
    good, _ = _put(blobs, 7)
    dense, _ = _put(blobs, 8, DENSE)
    items = [WeightedBlob(good, 1.0), WeightedBlob(dense, 1.0)]
    with pytest.raises(BadStoredUpdate) as err:
        aggregate_blobs(blobs, items, spec=SPEC, policy=SPARSE)
    assert err.value.index == 1 and err.value.digest == dense
    assert aggregate_blobs(blobs, items, spec=SPEC, policy=None).count == 2


def test_the_accumulator_adds_weight_times_scale_and_counts_the_weight() -> None:
    """``add`` puts ``weight * scale * delta`` into float64 sums of the spec's shapes and
    counts ``weight`` (a weight of 0 is an update that counts for nothing); ``add_dense``
    takes flat arrays too."""
    update = _decoded(_delta(9), DENSE)
    acc = Accumulator(SPEC)
    assert acc.spec is SPEC
    assert {k: (v.dtype, v.shape) for k, v in acc.sums.items()} == {
        "W": (np.float64, (6, 5)),
        "b": (np.float64, (5,)),
    }
    acc.add(update, 2.0, scale=0.25)
    acc.add(update, 0.0)
    want = {k: 0.5 * v.astype(np.float64) for k, v in _delta(9).items()}
    for name in want:
        np.testing.assert_array_equal(acc.sums[name], want[name])
    assert (acc.total_weight, acc.count) == (2.0, 2)
    acc.add_dense({k: v.reshape(-1) for k, v in _delta(9).items()}, 0.0)
    acc.add_dense(_delta(9), 1.0)
    assert (acc.total_weight, acc.count) == (3.0, 4)
    for name in want:
        np.testing.assert_array_equal(acc.sums[name], want[name] + _delta(9)[name])


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), float("-inf")])
def test_a_weight_that_is_negative_or_not_finite_is_refused(weight: float) -> None:
    update = _decoded(_delta(1), DENSE)
    acc = Accumulator(SPEC)
    with pytest.raises(ValueError) as err:
        acc.add(update, weight)
    assert str(err.value) == f"update weight must be finite and >= 0, got {weight}"
    assert (acc.count, acc.total_weight) == (0, 0.0)


def test_the_mean_divides_by_any_positive_total_weight() -> None:
    """A total weight below 1 still divides (0.5: the mean is twice the sum)."""
    acc = Accumulator(SPEC)
    acc.add_dense(_delta(2), 0.5)
    mean = acc.mean()
    for name, d in _delta(2).items():
        np.testing.assert_array_equal(mean[name], d.astype(np.float64))


def test_max_abs_is_the_largest_magnitude_of_the_carried_values() -> None:
    """Over every tensor, positive or negative (the upload's ``max_update_abs`` check reads
    it); 0.0 for an update that carries nothing."""
    delta = {"W": np.zeros((6, 5), np.float32), "b": np.zeros(5, np.float32)}
    delta["W"][2, 3], delta["W"][4, 1], delta["b"][0] = -7.5, 3.0, 6.25
    for sign, want in ((1.0, 7.5), (-1.0, 7.5)):
        scaled = {k: sign * v for k, v in delta.items()}
        assert max_abs(_decoded(scaled, SPARSE)) == want
    only_b = {"W": np.zeros((6, 5), np.float32), "b": np.full(5, -2.0, np.float32)}
    dense = _decoded(only_b, DENSE)
    assert max_abs(dense) == 2.0
    empty = dataclasses.replace(dense, tensors=[])
    assert max_abs(empty) == 0.0
