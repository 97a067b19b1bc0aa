"""Combining the decoded updates of one aggregation: mean, trimmed mean, median or Multi-Krum
(``aggregation.robust``), each after the per-update norm bound (:mod:`.bounds`).

- ``mean``: the weighted mean ``sum(w_i s_i delta_i) / sum(w_i)`` (``s_i`` the clip factor),
  streamed into one dense float64 accumulator (:mod:`.aggregate`), one update at a time.
- ``trimmed_mean``: per coordinate, the ``k = floor(trim_fraction * n)`` smallest and ``k``
  largest of the ``n`` values are dropped (by rank, unweighted: a large weight claim cannot
  save an outlier), and the rest is averaged **with the updates' weights** (examples times the
  staleness factor), so staleness discounting still applies among the kept values.
- ``median``: the unweighted coordinate-wise median (for an even ``n`` the mean of the two
  middle values). Weights are ignored: a weighted median would let a device that claims many
  examples, or a fresh update among stale ones, move the median by itself; a stale update
  counts like a fresh one, within ``max_staleness``.
- ``multi_krum`` (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent"; Multi-Krum in El Mhamdi et al. 2018): each update's score is the
  sum of its squared L2 distances to its ``n - f - 2`` nearest other updates (``f`` the
  ``krum_byzantine`` setting); the ``m`` updates with the lowest scores (``krum_select``,
  default ``n - f``) are averaged **with their weights**, the others are rejected. Selection
  is by distance alone (unweighted: a large example claim cannot get an update selected).
  It looks at whole updates, so it sees direction: an update pointing away from the others
  is far from all of them. Needs ``n >= 2f + 3``; an aggregation with fewer updates uses the
  largest ``f`` its ``n`` allows, ``floor((n - 3) / 2)`` (0 for ``n <= 4``: with ``f = 0`` and
  ``m = n`` the rule is the weighted mean), and ``m`` at most ``n - f``.

A sparse update did not send most coordinates; for the robust statistics those count as
**zero** for that update (what the update means: "no change there"). With top-k sparsified
updates this pulls the median and the trimmed mean towards zero on coordinates few devices
sent, which makes them conservative (a smaller step), never larger than the data.

Memory: the robust statistics need all ``n`` values of a coordinate at once. They are
computed over ranges of the flattened model (tensors in spec order, a range may span tensors
or split one) holding at most ``budget_bytes`` of working arrays: one ``(n, range)`` float64
matrix and the sort's temporaries. The decoded updates are kept between ranges while their
carried values and indices fit in ``budget_bytes`` too (the usual case for compressed
updates); otherwise every range decodes the updates again (slower, same memory). Peak memory
is therefore about ``2 * budget_bytes`` plus one decoded update plus the dense float64 result,
whatever ``n``. Multi-Krum needs the ``(n, n)`` Gram matrix of the (clipped) updates,
accumulated over the same coordinate ranges (``M @ M.T`` per range), then one more pass over
the updates to average the selected ones (from the kept decoded updates, or decoded again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedge.coordinator.engine.aggregate import Accumulator
from fedge.coordinator.engine.bounds import clip_scale, update_norm
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import DecodedUpdate

Robust = Literal["mean", "trimmed_mean", "median", "multi_krum"]
ROBUST = ("mean", "trimmed_mean", "median", "multi_krum")
#: Working memory of one coordinate range (and, separately, of the kept decoded updates).
DEFAULT_BUDGET_BYTES = 64 * 2**20
#: Bytes per matrix cell of each statistic: the float64 matrix plus the temporaries of the
#: reduction (trimmed mean: the int64 sort order, the gathered values and weights and their
#: product; median: the partitioned copy; multi_krum: the matrix and the float64 copy that
#: ``M @ M.T`` may make of it).
_CELL_BYTES = {"trimmed_mean": 48, "median": 24, "multi_krum": 16}

#: A fresh pass over the aggregation's decoded updates and their weights.
UpdateSource = Callable[[], Iterable[tuple[DecodedUpdate, float]]]


@dataclass
class Combined:
    """The combined delta (float64, model shapes), the sum of the weights of the updates it
    combines, and per update (in the order of the source) its L2 norm and the factor the bound
    scaled it by; ``multi_krum``: which updates it rejected and the ``f`` it applied."""

    delta: dict[str, np.ndarray]
    total_weight: float
    norms: list[float]
    scales: list[float]
    rejected: list[bool] = field(default_factory=list)
    krum_byzantine: int | None = None

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected)

    @property
    def num_clipped(self) -> int:
        return sum(1 for s in self.scales if s < 1.0)


def combine(
    source: UpdateSource,
    *,
    count: int,
    spec: ModelSpec,
    method: str,
    trim_fraction: float = 0.0,
    bound: float | None = None,
    krum_byzantine: int = 0,
    krum_select: int | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Combined:
    """Combine the ``count`` updates of ``source`` with ``method`` after clipping each to
    ``bound``."""
    if method == "mean":
        return _bounded_mean(source, spec=spec, bound=bound)
    if method not in _CELL_BYTES:
        raise ValueError(f"unknown robust aggregation {method!r}; use one of {ROBUST}")
    return _robust(
        source,
        count=count,
        spec=spec,
        method=method,
        trim_fraction=trim_fraction,
        bound=bound,
        krum_byzantine=krum_byzantine,
        krum_select=krum_select,
        budget_bytes=budget_bytes,
    )


def _bounded_mean(source: UpdateSource, *, spec: ModelSpec, bound: float | None) -> Combined:
    acc = Accumulator(spec)
    norms: list[float] = []
    scales: list[float] = []
    for update, weight in source():
        norm = update_norm(update)
        scale = clip_scale(norm, bound)
        acc.add(update, weight, scale=scale)
        norms.append(norm)
        scales.append(scale)
        del update
    total = acc.total_weight
    return Combined(acc.mean(), total, norms, scales)


def trimmed_count(n: int, trim_fraction: float) -> int:
    """Values dropped at each end of a coordinate: ``floor(trim_fraction * n)``, leaving at
    least one."""
    return max(0, min(math.floor(trim_fraction * n + 1e-9), (n - 1) // 2))


def reduce_trimmed(matrix: np.ndarray, weights: np.ndarray, trim: int) -> np.ndarray:
    """Per column of ``matrix`` (rows: updates): drop the ``trim`` smallest and largest values
    (stable order: ties keep the earlier row) and take the ``weights``-weighted mean of the
    rest (0 where the kept weights sum to 0). ``matrix`` may be overwritten."""
    n = matrix.shape[0]
    if trim == 0:
        kept, kept_w = matrix, np.broadcast_to(weights[:, None], matrix.shape)
    else:
        order = np.argsort(matrix, axis=0, kind="stable")[trim : n - trim]
        kept = np.take_along_axis(matrix, order, axis=0)
        kept_w = weights[order]
        del order
    num = np.einsum("ij,ij->j", kept, kept_w)
    den = kept_w.sum(axis=0)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def reduce_median(matrix: np.ndarray) -> np.ndarray:
    """The unweighted median of each column (``matrix`` is overwritten)."""
    return np.asarray(np.median(matrix, axis=0, overwrite_input=True), dtype=np.float64)


def krum_parameters(n: int, byzantine: int, select: int | None) -> tuple[int, int]:
    """The ``(f, m)`` Multi-Krum applies to ``n`` updates: ``f`` at most ``floor((n - 3) / 2)``
    (Krum's ``n >= 2f + 3``; 0 below 5 updates), ``m`` (default ``n - f``) at most ``n - f``."""
    f = max(0, min(byzantine, (n - 3) // 2))
    m = n - f if select is None else min(select, n - f)
    return f, max(1, m)


def krum_keep(gram: np.ndarray, byzantine: int, select: int) -> np.ndarray:
    """Multi-Krum on the Gram matrix ``G[i, j] = <u_i, u_j>`` of ``n`` updates: a boolean mask
    of the ``select`` updates with the lowest scores, the score of update ``i`` being the sum
    of its squared distances to its ``n - byzantine - 2`` nearest other updates (ties: the
    earlier update wins). With fewer than 3 updates every update is selected."""
    n = gram.shape[0]
    keep = np.zeros(n, dtype=bool)
    if n <= 2 or select >= n:
        keep[:] = True
        return keep
    diag = np.diag(gram)
    dist = np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)
    neighbours = max(1, n - byzantine - 2)
    nearest = np.partition(dist, neighbours - 1, axis=1)[:, :neighbours]
    scores = nearest.sum(axis=1)
    keep[np.argsort(scores, kind="stable")[:select]] = True
    return keep


def _carried_bytes(update: DecodedUpdate) -> int:
    return sum(
        t.values.nbytes + (0 if t.indices is None else t.indices.nbytes) for t in update.tensors
    )


def _scatter(
    update: DecodedUpdate,
    row: np.ndarray,
    lo: int,
    hi: int,
    offsets: Mapping[str, int],
    scale: float,
) -> None:
    """Write ``scale`` times the update's values of global coordinates ``[lo, hi)`` into
    ``row`` (zero elsewhere, as allocated); vectorized per tensor."""
    for t in update.tensors:
        start = offsets[t.name]
        a, b = max(lo, start) - start, min(hi, start + t.size) - start
        if a >= b:
            continue
        col = start + a - lo
        if t.indices is None:
            np.multiply(t.values[a:b], scale, out=row[col : col + b - a], dtype=np.float64)
        else:
            i0, i1 = np.searchsorted(t.indices, (a, b))
            if i1 > i0:
                row[t.indices[i0:i1] - a + col] = t.values[i0:i1].astype(np.float64) * scale


def _robust(
    source: UpdateSource,
    *,
    count: int,
    spec: ModelSpec,
    method: str,
    trim_fraction: float,
    bound: float | None,
    budget_bytes: int,
    krum_byzantine: int = 0,
    krum_select: int | None = None,
) -> Combined:
    offsets: dict[str, int] = {}
    total = 0
    for t in spec.tensors:
        offsets[t.name] = total
        total += math.prod(t.shape)
    n = count
    krum = method == "multi_krum"
    # The result of the coordinate-wise statistics (Multi-Krum accumulates its own).
    flat = np.zeros(0 if krum and n > 0 else total, dtype=np.float64)
    if n <= 0:
        return Combined(_shape(flat, spec), 0.0, [], [])
    cols = max(1, budget_bytes // (_CELL_BYTES[method] * n))
    gram = np.zeros((n, n), dtype=np.float64) if krum else None
    trim = trimmed_count(n, trim_fraction)
    norms: list[float] = []
    scales: list[float] = []
    weights_list: list[float] = []
    # The decoded updates, kept between ranges while they fit in the budget (None: they did
    # not; every range decodes them again).
    cache: list[DecodedUpdate] | None = []
    cached = 0
    first = True
    lo = 0
    while lo < total:
        hi = min(total, lo + cols)
        matrix = np.zeros((n, hi - lo), dtype=np.float64)
        passing: Iterable[tuple[DecodedUpdate, float]]
        if first or cache is None:
            passing = source()
        else:
            passing = ((u, w) for u, w in zip(cache, weights_list, strict=True))
        seen = 0
        for update, weight in passing:
            if seen >= n:
                raise RuntimeError(f"expected {n} updates to combine, got more")
            if first:
                norm = update_norm(update)
                norms.append(norm)
                scales.append(clip_scale(norm, bound))
                weights_list.append(weight)
                # More than one pass: worth keeping (Multi-Krum always makes a second one).
                if cache is not None and (total > cols or krum):
                    cached += _carried_bytes(update)
                    if cached <= budget_bytes:
                        cache.append(update)
                    else:
                        cache = None
            _scatter(update, matrix[seen], lo, hi, offsets, scales[seen])
            seen += 1
            del update
        if seen != n:
            raise RuntimeError(f"expected {n} updates to combine, got {seen}")
        first = False
        if gram is not None:
            gram += matrix @ matrix.T
        elif method == "median":
            flat[lo:hi] = reduce_median(matrix)
        else:
            weights = np.asarray(weights_list, dtype=np.float64)
            flat[lo:hi] = reduce_trimmed(matrix, weights, trim)
        del matrix
        lo = hi
    if gram is not None:
        return _krum_mean(
            source, spec, gram, norms, scales, weights_list, cache, krum_byzantine, krum_select
        )
    return Combined(_shape(flat, spec), math.fsum(weights_list), norms, scales)


def _krum_mean(
    source: UpdateSource,
    spec: ModelSpec,
    gram: np.ndarray,
    norms: list[float],
    scales: list[float],
    weights: list[float],
    cache: list[DecodedUpdate] | None,
    byzantine: int,
    select: int | None,
) -> Combined:
    """The weighted mean of the updates Multi-Krum selects on ``gram`` (second pass)."""
    n = len(weights)
    f, m = krum_parameters(n, byzantine, select)
    keep = krum_keep(gram, f, m)
    passing: Iterable[tuple[DecodedUpdate, float]]
    if cache is not None and len(cache) == n:
        passing = zip(cache, weights, strict=True)
    else:
        passing = source()
    acc = Accumulator(spec)
    seen = 0
    for update, weight in passing:
        if seen >= n:
            raise RuntimeError(f"expected {n} updates to combine, got more")
        if keep[seen]:
            acc.add(update, weight, scale=scales[seen])
        seen += 1
        del update
    if seen != n:
        raise RuntimeError(f"expected {n} updates to combine, got {seen}")
    total = acc.total_weight
    return Combined(
        acc.mean(), total, norms, scales, rejected=[not k for k in keep], krum_byzantine=f
    )


def _shape(flat: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    start = 0
    for t in spec.tensors:
        size = math.prod(t.shape)
        out[t.name] = flat[start : start + size].reshape(t.shape)
        start += size
    return out
