r"""Quantization onto a fixed integer grid in Z_{2^32}, and back.

Masks only hide values that live in a finite group, so a device's projected update ``v`` is
mapped to integers before masking:

1. **Clip** every value to ``[-B, B]`` (the grid's ``bound``). Under secure aggregation the
   coordinator never sees one device's update, so this clip *on the device* is where the
   per-value (and hence L2, at most ``B * sqrt(k)``) bound is enforced, and it holds only for
   devices that run this code. A modified device can send any element of Z_{2^32} per
   coordinate: a value outside ``[-s, s]`` corrupts (wraps) the decoded sum, and even in-grid
   values can be ``+B`` everywhere; masking hides which device did it. Enforcing the bound
   against such devices needs a zero-knowledge range proof on the masked input, which fedge
   does not implement (docs/secure-aggregation.md, "Threat model").
2. **Scale and round stochastically**: ``y = v * s / B`` in ``[-s, s]`` with
   ``s = 2**(bits-1) - 1``, and ``q = floor(y) + [u < frac(y)]`` with ``u`` uniform in [0, 1)
   from the caller's ``numpy.random.Generator``. So ``E[q] = y``: unbiased for the clipped value.
3. **Embed** ``q`` in Z_{2^32} as two's complement (``q mod 2**32`` as uint32).

The coordinator gets ``sum_u q_u mod 2**32``. As long as ``n * s < 2**31`` for every cohort of
at most ``n`` devices, the true sum lies in ``(-2**31, 2**31)`` and reading the uint32 result as
int32 recovers it exactly; :meth:`Grid.check_capacity` refuses any configuration where it
could not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.shared.secagg.errors import SecAggError

__all__ = ["MAX_GRID_BITS", "Grid"]

#: Largest grid width (with 31 bits only two devices fit; useful grids have 8 to 16 bits).
MAX_GRID_BITS = 31
_INT32_LIMIT = 1 << 31


@dataclass(frozen=True, kw_only=True)
class Grid:
    """``2s + 1`` levels ``j * B / s`` for ``j`` in ``[-s, s]``, ``s = 2**(bits-1) - 1``."""

    bound: float
    bits: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not 2 <= self.bits <= MAX_GRID_BITS:
            raise SecAggError("bad_config", f"grid bits must be in [2, {MAX_GRID_BITS}]")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise SecAggError("bad_config", f"grid bound must be finite and > 0, got {self.bound}")

    @property
    def half_levels(self) -> int:
        """``s``: grid steps on each side of zero."""
        return (1 << (self.bits - 1)) - 1

    @property
    def step(self) -> float:
        return self.bound / self.half_levels

    def max_cohort(self) -> int:
        """Largest ``n`` with ``n * s < 2**31``: the biggest cohort whose sum cannot overflow."""
        return (_INT32_LIMIT - 1) // self.half_levels

    def check_capacity(self, n_max: int) -> None:
        """Refuse (``overflow``) a cohort of up to ``n_max`` devices that could overflow."""
        if n_max < 1:
            raise SecAggError("bad_config", f"cohort size must be >= 1, got {n_max}")
        if n_max > self.max_cohort():
            raise SecAggError(
                "overflow",
                f"{n_max} devices * {self.half_levels} grid steps can reach 2**31: "
                f"at most {self.max_cohort()} devices with {self.bits}-bit grid values",
            )

    def quantize(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip, scale and stochastically round float ``values``; uint32 (two's complement)."""
        v = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError("values to quantize must be finite")
        s = float(self.half_levels)
        y = np.clip(v, -self.bound, self.bound) * (s / self.bound)
        np.clip(y, -s, s, out=y)  # the product may round a hair past s
        low = np.floor(y)
        q = low + (rng.random(y.size) < (y - low))
        return q.astype(np.int64).astype(np.uint32)

    def clipped_fraction(self, values: np.ndarray) -> float:
        """Share of values the clip changes (diagnostics for choosing ``bound``)."""
        v = np.asarray(values)
        return float(np.count_nonzero(np.abs(v) > self.bound)) / max(1, v.size)

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The exact integer sum (int64) of a cohort's quantized values from its uint32 sum."""
        return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)

    def dequantize(self, integers: np.ndarray) -> np.ndarray:
        """float32 values of grid integers (one device's, or a sum: ``q * B / s``)."""
        return (np.asarray(integers, dtype=np.float64) * self.step).astype(np.float32)
