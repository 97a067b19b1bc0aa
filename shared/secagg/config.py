"""One round's public secure-aggregation parameters, and what everyone derives from them."""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from fedge.shared.secagg.errors import SecAggError
from fedge.shared.secagg.graph import Graph
from fedge.shared.secagg.grid import Grid
from fedge.shared.secagg.prg import SEED_BYTES
from fedge.shared.secagg.support import shared_support

__all__ = ["MAX_COHORT", "RoundConfig"]

#: Largest cohort one secure-aggregation round accepts (cohort indices are u32 on the wire).
MAX_COHORT = 1 << 16

_DIGEST = struct.Struct("<QQIIIIdI")


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """Everything public about one round: the coordinator announces it, every device checks it.

    ``cohort`` devices take part with indices ``0 .. cohort-1`` (the coordinator's order of the
    selected devices); ``degree`` and ``threshold`` are the neighbour graph's (threshold
    ``t > degree / 2``, see docs/secure-aggregation.md); ``k`` of the model's ``size``
    coordinates are sent, quantized onto ``grid``. ``seed`` is the round's public seed.
    ``fixed_support``: the round's ``k`` sorted support indices when they are not the seeded
    random-k set of the seed (``aggregate_support``); they enter the digest, so a device that
    derived a different set cannot take part in the round.
    """

    task_id: int
    round: int
    seed: bytes
    cohort: int
    degree: int
    threshold: int
    size: int
    k: int
    grid: Grid
    fixed_support: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_BYTES:
            raise SecAggError("bad_config", f"the round seed has {SEED_BYTES} bytes")
        if not 2 <= self.cohort <= MAX_COHORT:
            raise SecAggError("bad_config", f"cohort must be in [2, {MAX_COHORT}]")
        if not 1 <= self.k <= self.size:
            raise SecAggError("bad_config", f"k must be in [1, {self.size}], got {self.k}")
        if not (
            self.degree == self.cohort - 1
            or (2 <= self.degree < self.cohort - 1 and self.degree % 2 == 0)
        ):
            raise SecAggError(
                "bad_config",
                f"degree must be even in [2, {self.cohort - 2}] or {self.cohort - 1}, "
                f"got {self.degree}",
            )
        if not self.degree // 2 < self.threshold <= self.degree:
            raise SecAggError(
                "bad_config",
                f"threshold must be in ({self.degree // 2}, {self.degree}], got {self.threshold}",
            )
        if not (0 <= self.task_id < 1 << 64 and 0 <= self.round < 1 << 64):
            raise SecAggError("bad_config", "task and round must fit in 64 bits")
        self.grid.check_capacity(self.cohort)
        if self.fixed_support is not None:
            fixed = self.fixed_support
            if not (
                fixed.dtype == np.int64
                and fixed.shape == (self.k,)
                and fixed[0] >= 0
                and fixed[-1] < self.size
                and bool(np.all(np.diff(fixed) > 0))
            ):
                raise SecAggError(
                    "bad_config", f"the support must be {self.k} sorted distinct int64 indices"
                )

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of every parameter: the salt of every key derivation and the round tag of
        every message, so nothing of one round can be replayed into another."""
        fields = _DIGEST.pack(
            self.task_id,
            self.round,
            self.cohort,
            self.degree,
            self.threshold,
            self.k,
            self.grid.bound,
            self.grid.bits,
        )
        extra = struct.pack("<Q", self.size)
        if self.fixed_support is not None:
            extra += hashlib.sha256(self.fixed_support.astype("<i8").tobytes()).digest()
        return hashlib.sha256(b"fedge-secagg round v1" + self.seed + fields + extra).digest()

    @functools.cached_property
    def graph(self) -> Graph:
        return Graph.harary(self.seed, self.cohort, self.degree)

    @functools.cached_property
    def support(self) -> np.ndarray:
        if self.fixed_support is not None:
            return self.fixed_support
        return shared_support(self.seed, self.size, self.k)
