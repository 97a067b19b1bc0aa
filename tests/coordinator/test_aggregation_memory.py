"""Aggregating many sparse updates needs memory for about one dense model, not for all of
them: 1,000 top-1% updates of a 1M-parameter model, streamed from the blob store."""

from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.blobstore import FileBlobStore
from fedge.coordinator.engine.aggregate import Accumulator, WeightedBlob, aggregate_blobs
from fedge.shared.compression import CompressedTensor, CompressedUpdate, decompress
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.quantize import quantize
from fedge.shared.topk import topk_count
from fedge.shared.wire import encode_update

ROWS, COLS = 1000, 1000
NUM_UPDATES = 1000
POLICY = CompressionPolicy(topk_fraction=0.01, bits=4, chunk=256, error_feedback=False)


def _sparse_update(rng: np.random.Generator, k: int) -> CompressedUpdate:
    indices = np.unique(rng.integers(0, ROWS * COLS, size=k))
    values = rng.standard_normal(indices.size).astype(np.float32)
    q = quantize(values, bits=POLICY.bits, chunk=POLICY.chunk, rng=rng)
    tensor = CompressedTensor("W", (ROWS, COLS), indices, quantized=q)
    return CompressedUpdate(
        bits=POLICY.bits,
        chunk=POLICY.chunk,
        topk_fraction=POLICY.topk_fraction,
        scope=POLICY.scope,
        tensors=(tensor,),
    )


def _fast_dir(tmp_path: Path) -> Path:
    """A tmpfs directory when there is one (the blob store fsyncs every write, which only
    slows this test down), else the test's temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="fedge-test-", dir=shm))
    return tmp_path


@pytest.mark.slow
def test_peak_memory_stays_within_a_small_multiple_of_one_dense_model(tmp_path: Path) -> None:
    spec = ModelSpec.from_dict([{"name": "W", "shape": [ROWS, COLS]}])
    root = _fast_dir(tmp_path)
    blobs = FileBlobStore(root / "blobs")
    rng = np.random.default_rng(2024)
    k = topk_count(ROWS * COLS, POLICY.topk_fraction)
    # 100 distinct sparsity patterns; each blob is distinct through its num_examples.
    pool = [_sparse_update(rng, k) for _ in range(100)]
    items = []
    decoded_bytes = 0
    for i in range(NUM_UPDATES):
        update = pool[i % len(pool)]
        # What the decoded update holds: int64 indices and float32 values.
        decoded_bytes += update.nnz * (8 + 4)
        data = encode_update(update, task_id=1, base_version=0, num_examples=5 + i)
        items.append(WeightedBlob(blobs.put(data), float(5 + i)))
        del data

    dense_bytes = ROWS * COLS * np.dtype(np.float64).itemsize
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        acc = aggregate_blobs(blobs, items, spec=spec, policy=POLICY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    if root != tmp_path:
        shutil.rmtree(root)
    assert acc.count == NUM_UPDATES
    assert acc.total_weight == sum(i.weight for i in items)
    # Same sum as the dense reference (pattern j enters with the weights of its copies).
    reference = Accumulator(spec)
    for j, update in enumerate(pool):
        reference.add_dense(decompress(update), sum(i.weight for i in items[j :: len(pool)]))
    np.testing.assert_allclose(acc.sums["W"], reference.sums["W"], rtol=1e-9, atol=1e-6)
    # Holding every decoded update at once would break the bound many times over.
    assert decoded_bytes > 10 * dense_bytes
    assert peak < 4 * dense_bytes, f"peak {peak / 1e6:.1f} MB vs dense {dense_bytes / 1e6:.1f} MB"
