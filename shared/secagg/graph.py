"""The SecAgg+ neighbour graph: which devices of a round mask with (and share to) which.

Bell et al. 2020 ("Secure single-server aggregation with (poly)logarithmic overhead") replace
Bonawitz et al.'s complete graph by a random sparse one: a device agrees pairwise masks with,
and secret-shares its seeds to, only its ``d`` neighbours, so a round costs ``O(n d)`` instead
of ``O(n^2)``.

fedge uses a random Harary graph: the cohort indices ``0 .. n-1`` are permuted by a
permutation derived from the round's public seed, and each device is joined to the ``d/2``
devices before and after it on that ring (``d`` even; ``d = n - 1`` is the complete graph).
Every device and the coordinator compute the same graph from the seed.

:func:`plan_degree` picks ``d`` and the threshold ``t = floor(d/2) + 1``: the smallest even ``d``
for which, if each device independently drops with probability ``dropout``, the chance that
some device keeps fewer than ``t`` live neighbours (so its secrets cannot be rebuilt and the
round fails) is at most ``failure``. The required ``d`` grows with ``log n`` (a union bound
over ``n`` devices) but its constant grows fast with ``dropout``: for 1/3 and 2**-20 it is
complete for every cohort below a few hundred devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.shared.secagg.errors import SecAggError
from fedge.shared.secagg.prg import derive, keystream_u64

__all__ = ["Graph", "plan_degree"]

_GRAPH_INFO = b"fedge-secagg graph v1"


def _tail_at_least(d: int, p: float, m: int) -> float:
    """P(Binomial(d, p) >= m)."""
    return sum(math.comb(d, i) * p**i * (1 - p) ** (d - i) for i in range(m, d + 1))


def plan_degree(n: int, *, dropout: float, failure: float = 2.0**-20) -> tuple[int, int]:
    """``(degree, threshold)`` for a cohort of ``n`` (see the module docstring)."""
    if n < 2:
        raise SecAggError("bad_config", f"secure aggregation needs >= 2 devices, got {n}")
    if not 0.0 <= dropout < 0.5:
        raise SecAggError("bad_config", f"planned dropout must be in [0, 0.5), got {dropout}")
    for d in range(2, n - 1, 2):
        t = d // 2 + 1
        # The device itself must be live too; its d neighbours may drop independently.
        if n * _tail_at_least(d, dropout, d - t + 1) <= failure:
            return d, t
    return n - 1, (n - 1) // 2 + 1


@dataclass(frozen=True)
class Graph:
    """Neighbour lists of a round's cohort (indices ``0 .. n-1``)."""

    n: int
    degree: int
    neighbours: tuple[tuple[int, ...], ...]

    @classmethod
    def harary(cls, seed: bytes, n: int, degree: int) -> Graph:
        if n < 2:
            raise SecAggError("bad_config", f"secure aggregation needs >= 2 devices, got {n}")
        if degree == n - 1:
            full = tuple(tuple(v for v in range(n) if v != u) for u in range(n))
            return cls(n, degree, full)
        if degree < 2 or degree % 2 or degree > n - 1:
            raise SecAggError("bad_config", f"degree must be even in [2, {n - 2}] or {n - 1}")
        keys = keystream_u64(derive(seed, salt=b"", info=_GRAPH_INFO), n)
        ring = np.argsort(keys, kind="stable")  # ring position -> device
        position = np.empty(n, dtype=np.int64)
        position[ring] = np.arange(n)
        offsets = np.concatenate([np.arange(1, degree // 2 + 1), -np.arange(1, degree // 2 + 1)])
        table = ring[(position[:, None] + offsets[None, :]) % n]
        table.sort(axis=1)
        return cls(n, degree, tuple(tuple(int(v) for v in row) for row in table))

    def are_neighbours(self, u: int, v: int) -> bool:
        return v in self.neighbours[u]
