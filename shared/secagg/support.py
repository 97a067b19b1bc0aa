"""The round's shared sparse support and the projection of an update onto it.

Pairwise masks only cancel where every device writes, so under secure aggregation all devices
of a round send values on the *same* ``k`` coordinates: a seeded random-k index set derived
from the round's public seed. The set depends on nothing any device holds, so it leaks
nothing; a device's own top-k set would reveal which of its coordinates moved most.

Each coordinate ``i`` of the flattened model (tensors in spec order, C order) gets the key
``keystream_u64(HKDF(seed, "fedge-secagg support"), size)[i]``; the support is the ``k``
coordinates with the smallest keys (ties by index), returned sorted. Every device and the
coordinator compute it the same way.
"""

from __future__ import annotations

import numpy as np

from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.secagg.prg import SEED_BYTES, derive, keystream_u64

__all__ = ["flatten", "project", "shared_support", "unflatten"]

_SUPPORT_INFO = b"fedge-secagg support v1"


def shared_support(seed: bytes, size: int, k: int) -> np.ndarray:
    """Sorted int64 indices of the round's ``k`` support coordinates out of ``size``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"the round seed has {SEED_BYTES} bytes, got {len(seed)}")
    if not 1 <= k <= size:
        raise ValueError(f"k must be in [1, {size}], got {k}")
    if k == size:
        return np.arange(size, dtype=np.int64)
    keys = keystream_u64(derive(seed, salt=b"", info=_SUPPORT_INFO), size)
    chosen = np.argsort(keys, kind="stable")[:k]
    chosen.sort()
    return chosen.astype(np.int64, copy=False)


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
