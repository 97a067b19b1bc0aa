"""Top-k sparsification by magnitude.

``topk_count`` is the single definition of "k" shared by the compressor and by the decoder's
policy check, so both agree on how many values an update may carry.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["top_k_indices", "topk_count"]

# Below this size a plain argpartition is as fast as anything cleverer.
_SAMPLE_MIN_SIZE = 1 << 16
# Number of elements in the strided sample used to guess the selection threshold.
_SAMPLE_SIZE = 1 << 16


def topk_count(size: int, fraction: float) -> int:
    """``k = ceil(fraction * size)``, at least 1 for a non-empty tensor, at most ``size``.

    A tolerance of 1e-6 absorbs binary rounding of the product (``0.07 * 100`` is
    ``7.000000000000001`` in floating point, which must give 7, not 8).
    """
    if size <= 0:
        return 0
    k = math.ceil(fraction * size - 1e-6)
    return min(size, max(1, k))


def top_k_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat int64 indices of ``k`` largest entries of a 1-D non-negative array.

    Ties are broken arbitrarily (but deterministically for a given input). For large inputs
    with a small ``k`` a strided sample gives a threshold ``t`` just below the k-th largest
    value; the exact selection then runs only over the entries ``>= t``. This is exact: when
    at least ``k`` entries reach ``t``, every k-th-largest candidate is among them. If the
    guess was too high the full ``argpartition`` runs instead, so only speed depends on it.
    """
    n = magnitude.size
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if n >= _SAMPLE_MIN_SIZE and k <= n // 4:
        idx = _sampled_top_k(magnitude, k)
        if idx is not None:
            return idx
    idx = np.argpartition(magnitude, n - k)[n - k :].astype(np.int64, copy=False)
    idx.sort()
    return idx


def _sampled_top_k(magnitude: np.ndarray, k: int) -> np.ndarray | None:
    n = magnitude.size
    sample = magnitude[:: max(1, n // _SAMPLE_SIZE)]
    m = sample.size
    # Expected number of sample entries above the k-th largest, plus a generous margin so the
    # threshold lands below it with high probability (binomial sd is sqrt(expected)).
    expected = m * k / n
    above = min(m, math.ceil(1.2 * expected + 4.0 * math.sqrt(expected) + 8))
    if above >= m:
        return None
    threshold = np.partition(sample, m - above)[m - above]
    candidates = np.flatnonzero(magnitude >= threshold)
    c = candidates.size
    if c < k or c > n // 2:
        return None
    chosen = candidates[np.argpartition(magnitude[candidates], c - k)[c - k :]]
    chosen.sort()
    return chosen.astype(np.int64, copy=False)
