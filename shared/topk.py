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

    Finds the k-th largest value ``v`` with ``np.partition`` and keeps every entry ``> v``
    plus the first (lowest-index) entries ``== v`` needed to reach exactly ``k``; the indices
    come out of ``np.flatnonzero`` already sorted, so no O(k log k) sort is needed.

    For large inputs with a small ``k`` a strided sample first gives a threshold ``t`` just
    below the k-th largest value and the selection runs only over the entries ``>= t``. This
    is exact: when at least ``k`` entries reach ``t``, all entries ``>= v`` are among them. If
    the guess was too high the selection runs over the whole array, so only speed depends on
    the sample.
    """
    n = magnitude.size
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    candidates = None
    if n >= _SAMPLE_MIN_SIZE and k <= n // 4:
        candidates = _candidates(magnitude, k)
    values = magnitude if candidates is None else magnitude[candidates]
    c = values.size
    kth = np.partition(values, c - k)[c - k]
    keep = values > kth
    missing = k - int(np.count_nonzero(keep))
    keep[np.flatnonzero(values == kth)[:missing]] = True
    chosen = np.flatnonzero(keep)
    if candidates is not None:
        chosen = candidates[chosen]
    return chosen.astype(np.int64, copy=False)


def _candidates(magnitude: np.ndarray, k: int) -> np.ndarray | None:
    """Sorted indices of all entries ``>= t`` for a sampled ``t``, if there are >= k of them."""
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
    if candidates.size < k or candidates.size > n // 2:
        return None
    return candidates
