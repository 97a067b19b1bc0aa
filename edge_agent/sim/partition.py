"""Splitting a dataset across simulated devices: IID and Dirichlet non-IID.

Both functions return one index array per device; together they use every sample exactly
once. :func:`dirichlet_partition` draws, for every class, the share each device gets from a
Dirichlet(``alpha``) distribution: a small ``alpha`` gives each device few classes (strong
skew), a large one approaches IID. Everything is vectorized and seeded by the ``rng`` passed.
"""

from __future__ import annotations

import numpy as np


def _check(num_samples: int, num_devices: int, min_size: int) -> None:
    if num_devices < 1:
        raise ValueError("num_devices must be at least 1")
    if min_size < 0:
        raise ValueError("min_size must not be negative")
    if num_samples < num_devices * max(1, min_size):
        raise ValueError(
            f"{num_samples} samples cannot give {num_devices} devices "
            f"at least {max(1, min_size)} sample(s) each"
        )


def iid_partition(num_samples: int, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_devices`` parts whose sizes differ by at most one."""
    _check(num_samples, num_devices, 1)
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_devices)]


def dirichlet_partition(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 5,
) -> list[np.ndarray]:
    """Label-skewed split: device shares of every class ~ Dirichlet(alpha); each device ends
    with at least ``min_size`` samples (taken at random from the largest devices)."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    n = y.shape[0]
    _check(n, num_devices, min_size)
    classes, y_idx = np.unique(y, return_inverse=True)
    shares = rng.dirichlet(np.full(num_devices, float(alpha)), size=classes.size)
    cum = np.cumsum(shares, axis=1)
    cum[:, -1] = 1.0
    # Rank of every sample within its class, in a random order.
    order = rng.permutation(n)
    order = order[np.argsort(y_idx[order], kind="stable")]
    counts = np.bincount(y_idx, minlength=classes.size)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    position = (rank + 0.5) / counts[y_idx]
    device = (position[:, None] >= cum[y_idx]).sum(axis=1)
    device = np.minimum(device, num_devices - 1)
    device = _ensure_min_size(device, num_devices, min_size, rng)
    return _group(device, num_devices)


def _ensure_min_size(
    device: np.ndarray, num_devices: int, min_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Move random samples from the largest devices to those below ``min_size``."""
    device = device.copy()
    sizes = np.bincount(device, minlength=num_devices)
    for short in np.flatnonzero(sizes < min_size):
        while sizes[short] < min_size:
            donor = int(np.argmax(sizes))
            need = min(min_size - int(sizes[short]), int(sizes[donor]) - min_size)
            candidates = np.flatnonzero(device == donor)
            moved = rng.choice(candidates, size=need, replace=False)
            device[moved] = short
            sizes[short] += need
            sizes[donor] -= need
    return device


def _group(device: np.ndarray, num_devices: int) -> list[np.ndarray]:
    order = np.argsort(device, kind="stable")
    cuts = np.cumsum(np.bincount(device, minlength=num_devices))[:-1]
    return list(np.split(order, cuts))


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each device's label distribution and the
    global one (0 = IID, near 1 = every device holds one class)."""
    y = np.asarray(labels)
    classes, y_idx = np.unique(y, return_inverse=True)
    k = classes.size
    global_dist = np.bincount(y_idx, minlength=k) / y.size
    dists = []
    for part in parts:
        counts = np.bincount(y_idx[part], minlength=k)
        dists.append(0.5 * np.abs(counts / max(1, part.size) - global_dist).sum())
    return float(np.mean(dists))
