"""The round's shared sparse support and the projection of an update onto it.

Pairwise masks only cancel where every device writes, so under secure aggregation all devices
of a round send values on the *same* ``k`` coordinates: a seeded random-k index set derived
from the round's public seed. The set depends on nothing any device holds, so it leaks
nothing; a device's own top-k set would reveal which of its coordinates moved most.

Each coordinate ``i`` of the flattened model (tensors in spec order, C order) gets the key
``keystream_u64(HKDF(seed, "fedge-secagg support"), size)[i]``; the support is the ``k``
coordinates with the smallest keys (ties by index), returned sorted. Every device and the
coordinator compute it the same way.

The alternative, :func:`aggregate_support`, puts the round's values where the *published*
aggregates moved the model most: the ``k - r`` coordinates of largest
:func:`aggregate_score` (the magnitudes of the last aggregate updates, an exponential average
over a bounded window), the other ``r = round(random_share * k)`` coordinates seeded random-k
from the round seed among the rest. Its inputs are public model versions only (every device
and the coordinator hold them), so it reveals nothing the sums did not. The first round (no
aggregate yet) falls back to :func:`shared_support`. Half and half from the last aggregate
(the defaults) measured better than random-k on every seed (docs/secure-aggregation.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.secagg.prg import SEED_BYTES, derive, keystream_u64

__all__ = [
    "aggregate_score",
    "aggregate_support",
    "flatten",
    "project",
    "shared_support",
    "unflatten",
]

_SUPPORT_INFO = b"fedge-secagg support v1"


def shared_support(seed: bytes, size: int, k: int) -> np.ndarray:
    """Sorted int64 indices of the round's ``k`` support coordinates out of ``size``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"the round seed has {SEED_BYTES} bytes, got {len(seed)}")
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}], got {k}")
    if k == size:
        return np.arange(size, dtype=np.int64)
    chosen = _random_order(seed, size)[:k]
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


def _random_order(seed: bytes, size: int) -> np.ndarray:
    """Every coordinate, in the order of its seeded key (ties by index)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"the round seed has {SEED_BYTES} bytes, got {len(seed)}")
    keys = keystream_u64(derive(seed, salt=b"", info=_SUPPORT_INFO), size)
    return np.argsort(keys, kind="stable")


def aggregate_score(versions: Sequence[np.ndarray], decay: float = 0.0) -> np.ndarray | None:
    """The public score of every coordinate from the last published model versions.

    ``versions`` are the flattened published models (spec order, float32; with compressed
    downloads the broadcast models every device rebuilds bit for bit) of consecutive
    versions, oldest first, ending with the round's base model ``w_r``; the aggregate update
    of round ``j`` is ``w_{j+1} - w_j``. The score is
    ``sum_j decay^(r-1-j) * |w_{j+1} - w_j|`` over the window the versions span
    (``decay = 0``: the last aggregate alone, which needs only ``w_{r-1}`` and ``w_r``).
    ``None`` with fewer than two versions (the first round). Only correctly rounded
    elementwise float32 operations, in a fixed order, so every platform computes the
    same bits from the same versions."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if len(versions) < 2:
        return None
    flat = [np.asarray(v, np.float32).reshape(-1) for v in versions]
    if any(v.shape != flat[0].shape for v in flat):
        raise ValueError("the model versions differ in size")
    score = np.zeros(flat[0].shape, np.float32)
    factor = np.float32(decay)
    for older, newer in itertools.pairwise(flat):
        score = score * factor + np.abs(newer - older)
    if not np.all(np.isfinite(score)):
        raise ValueError("the model versions are not finite")
    return score


def aggregate_support(
    seed: bytes, size: int, k: int, score: np.ndarray | None, random_share: float = 0.5
) -> np.ndarray:
    """Sorted int64 indices of the round's ``k`` support coordinates: ``k - r`` of largest
    ``score`` (ties by index; coordinates scored 0 are never picked by score) and
    ``r = round(random_share * k)`` from ``seed`` among the rest: the first in the order of
    :func:`shared_support`'s keys (more when fewer than ``k - r`` coordinates have a positive
    score). ``score=None`` (the first round) or ``random_share=1``: :func:`shared_support`."""
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    if score is None or random_share == 1.0:
        return shared_support(seed, size, k)
    score = np.asarray(score)
    if score.shape != (size,) or score.dtype != np.float32:
        raise ValueError(f"the score is a float32 vector of {size} values")
    if not np.all(np.isfinite(score)):
        raise ValueError("the score is not finite")
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}], got {k}")
    order = _random_order(seed, size)
    k_top = min(k - round(random_share * k), int(np.count_nonzero(score > 0)))
    chosen = np.zeros(size, dtype=bool)
    if k_top:
        chosen[np.argsort(-score, kind="stable")[:k_top]] = True
    rest = order[~chosen[order]][: k - k_top]
    chosen[rest] = True
    return np.flatnonzero(chosen).astype(np.int64, copy=False)


def flatten(weights: Weights, spec: ModelSpec) -> np.ndarray:
    """One float32 vector of every tensor in spec order (C order within a tensor)."""
    spec.check(weights)
    return np.concatenate([np.asarray(weights[t.name], np.float32).ravel() for t in spec.tensors])


def unflatten(flat: np.ndarray, spec: ModelSpec) -> Weights:
    """Inverse of :func:`flatten` (views into ``flat`` reshaped per tensor)."""
    if flat.shape != (spec.num_params,):
        raise ValueError(f"expected {spec.num_params} values, got shape {flat.shape}")
    out: Weights = {}
    start = 0
    for t in spec.tensors:
        stop = start + t.size
        out[t.name] = flat[start:stop].reshape(t.shape)
        start = stop
    return out


def project(flat: np.ndarray, support: np.ndarray) -> np.ndarray:
    """The values of ``flat`` on the support (float32, support order)."""
    return np.asarray(flat, np.float32)[support]
