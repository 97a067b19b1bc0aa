r"""Unbiased stochastic uniform quantization with 1, 2, 4 or 8 bits and one scale per chunk.

Scheme
------
Values are cut into chunks of ``chunk`` consecutive values (the last one may be shorter). A
chunk ``v`` of length ``d`` gets the scale ``m = max_i |v_i|`` (float32) and the grid of
``2s + 1`` evenly spaced levels

    L_j = (j - s) * m / s,   j = 0 .. 2s,   spacing  D = m / s,

with ``s = 2**(b-1) - 1`` for ``b >= 2`` bits (s = 1, 7, 127: the grid is symmetric and
contains 0; one of the ``2**b`` codes is unused) and ``s = 1/2`` for one bit (levels
``{-m, +m}``, D = 2m). Each value is rounded stochastically to one of its two neighbouring
levels: with ``y = v/D + s`` in ``[0, 2s]``, the code is ``floor(y) + [u < frac(y)]`` for
``u`` uniform in [0, 1) drawn from the caller's ``numpy.random.Generator`` (as 32-bit integers
from its bit generator, see :func:`uniform_u32`). So ``E[L_q] = v`` (unbiased), up to float32
rounding of ``y`` and a ``2**-32`` resolution of the rounding probability.

Variance bound
--------------
With ``p_i = frac(y_i)``, the error of one value has variance ``D**2 * p_i * (1 - p_i)``.

1. ``p(1-p) <= 1/4`` gives ``E||Q(v) - v||^2 <= d D^2 / 4 = d m^2 / (4 s^2) <= d/(4 s^2) ||v||^2``.
2. For ``b >= 2`` zero is a level, so a value ``v_i >= 0`` lies in ``[l D, (l+1) D]`` with
   ``l >= 0`` and ``p_i <= v_i / D`` (likewise for negative values); hence the variance is at
   most ``D |v_i|`` and the sum at most ``(m/s) ||v||_1 <= (sqrt(d)/s) ||v||^2`` (Cauchy-Schwarz
   and ``m <= ||v||``).

Together: ``E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) * ||v||^2`` per chunk, which is QSGD's
Lemma 3.1 (Alistarh et al., 2017) with QSGD's ``s`` = the number of levels on each side of zero
(our ``s``); our max-norm scale is never larger than QSGD's 2-norm scale.

For one bit the variance is exactly ``sum_i (m^2 - v_i^2) = d m^2 - ||v||^2 <= (d-1) ||v||^2``:
QSGD's first branch ``d/s^2`` with ``s = 1``. The ``sqrt(d)/s`` branch cannot hold for *any*
unbiased one-bit code with per-chunk levels ``a <= -m``, ``b >= m``: a zero must be sent as
``a`` or ``b``, with variance ``-ab >= m^2``, so ``v = (m, -m, 0, ..., 0)`` has error variance
at least ``(d-2) m^2 = (d-2)/2 ||v||^2``.

Codes are bit-packed least-significant-first: value ``i`` sits in byte ``i // (8/b)`` at bit
offset ``(i % (8/b)) * b``; unused high bits of the last byte are zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "QUANT_BITS",
    "Quantized",
    "chunk_scales",
    "dequantize",
    "half_levels",
    "level_table",
    "max_code",
    "pack_codes",
    "packed_size",
    "quantize",
    "uniform_u32",
    "unpack_codes",
]

#: Bit widths the quantizer supports.
QUANT_BITS = (1, 2, 4, 8)


def half_levels(bits: int) -> float:
    """The grid's ``s``: levels on each side of zero (1/2 for the one-bit grid {-m, m})."""
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}, got {bits}")
    return 0.5 if bits == 1 else float(2 ** (bits - 1) - 1)


def max_code(bits: int) -> int:
    """Largest valid code, ``2s`` (1, 2, 14, 254 for 1, 2, 4, 8 bits)."""
    return int(2 * half_levels(bits))


def level_table(bits: int) -> np.ndarray:
    """float32 levels in units of the scale, ``level(j)`` for every valid code ``j``."""
    s = half_levels(bits)
    codes = np.arange(max_code(bits) + 1, dtype=np.float32)
    return (codes - np.float32(s)) * np.float32(1.0 / s)


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


@dataclass(frozen=True, eq=False)
class Quantized:
    """Quantized values: one uint8 code per value, one float32 scale per chunk."""

    bits: int
    chunk: int
    codes: np.ndarray
    scales: np.ndarray

    @property
    def count(self) -> int:
        return int(self.codes.size)


def _pieces(n: int, chunk: int) -> Iterator[tuple[slice, slice, int]]:
    """Split ``n`` values into the full chunks and the short last chunk.

    Yields ``(value_slice, scale_slice, rows)``; the values of a piece reshape to
    ``(rows, -1)`` so per-chunk scales broadcast without repeating them per value.
    """
    full = n // chunk
    if full:
        yield slice(0, full * chunk), slice(0, full), full
    if n > full * chunk:
        yield slice(full * chunk, n), slice(full, full + 1), 1


def chunk_scales(values: np.ndarray, chunk: int) -> np.ndarray:
    """Per-chunk ``max |v|`` of a 1-D float32 array, as float32."""
    n = values.size
    scales = np.empty(-(-n // chunk), dtype=np.float32)
    for vs, ss, rows in _pieces(n, chunk):
        block = values[vs].reshape(rows, -1)
        np.maximum(block.max(axis=1), -block.min(axis=1), out=scales[ss])
    return scales


#: Values per block: temporaries of a block (~1 MB each) stay in cache and are reused from the
#: heap, instead of each whole-array temporary costing fresh pages.
_BLOCK = 1 << 18


def _blocks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of whole chunks covering ``n`` values."""
    step = chunk * max(1, _BLOCK // chunk)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def quantize(values: np.ndarray, *, bits: int, chunk: int, rng: np.random.Generator) -> Quantized:
    """Stochastically quantize finite float32 ``values`` (see the module docstring)."""
    s = np.float32(half_levels(bits))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = x.size
    scales = chunk_scales(x, chunk)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.empty(n, dtype=np.uint8)
    for start, stop in _blocks(n, chunk):
        xb, first = x[start:stop], start // chunk
        y = np.empty(stop - start, dtype=np.float32)
        for vs, ss, rows in _pieces(stop - start, chunk):
            block_safe = safe[first + ss.start : first + ss.stop, None]
            np.divide(xb[vs].reshape(rows, -1), block_safe, out=y[vs].reshape(rows, -1))
        # |x / m| <= 1 exactly (correctly rounded division), and rounding is monotonic, so y
        # lies in [0, 2s] without clipping.
        y *= s
        y += s
        cb = codes[start:stop]
        np.copyto(cb, y, casting="unsafe")  # truncation is floor for y >= 0
        y -= cb  # fractional part p in [0, 1): the probability of rounding up
        # floor(p * 2**32): the scaling is exact (a power of two) and stays below 2**32.
        threshold = np.multiply(
            y, np.float32(2.0**32), out=np.empty(y.size, np.uint32), casting="unsafe"
        )
        cb += uniform_u32(rng, y.size) < threshold
    return Quantized(bits=bits, chunk=chunk, codes=codes, scales=scales)


# Bit generators whose raw output is 64 uniform bits (MT19937's raw output is 32 bits).
_RAW64 = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)


def uniform_u32(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniform uint32 draws from ``rng`` (two per raw 64-bit output when possible, the low
    half first).

    Rounding up when ``u < floor(p * 2**32)`` happens with probability within ``2**-32`` of
    ``p``. Splitting raw 64-bit outputs is 2.5x faster than ``rng.random(n, dtype=float32)``
    (which also has a coarser ``2**-24`` resolution); other bit generators use
    ``rng.integers``.
    """
    if type(rng.bit_generator) in _RAW64:
        raw = rng.bit_generator.random_raw((n + 1) // 2)
        return np.asarray(raw, dtype=np.uint64).view(np.uint32)[:n]
    return rng.integers(0, 1 << 32, size=n, dtype=np.uint32)


def dequantize(q: Quantized) -> np.ndarray:
    """float32 values ``level(code) * scale``, with ``level(j) = (j - s) * float32(1/s)``.

    The level is in [-1, 1] before the scale is applied, so nothing overflows. (Arithmetic
    rather than a table lookup: ``np.take`` would first widen the uint8 codes to intp.)
    """
    s = np.float32(half_levels(q.bits))
    inv = np.float32(1.0 / float(s))
    out = np.empty(q.codes.size, dtype=np.float32)
    for start, stop in _blocks(out.size, q.chunk):
        ob, first = out[start:stop], start // q.chunk
        np.copyto(ob, q.codes[start:stop], casting="unsafe")
        ob -= s
        ob *= inv
        for vs, ss, rows in _pieces(stop - start, q.chunk):
            ob[vs].reshape(rows, -1)[...] *= q.scales[first + ss.start : first + ss.stop, None]
    return out


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (each ``< 2**bits``) into ``packed_size`` bytes, LSB first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    if bits == 1:
        return np.packbits(codes, bitorder="little")
    per = 8 // bits
    n = codes.size
    full = n // per
    out = np.empty(packed_size(n, bits), dtype=np.uint8)
    main = codes[: full * per].reshape(full, per)
    body = out[:full]
    body[...] = main[:, 0]
    for j in range(1, per):
        body |= main[:, j] << (j * bits)
    if n > full * per:
        tail = codes[full * per :]
        shifts = (np.arange(tail.size) * bits).astype(np.uint8)
        out[full] = np.bitwise_or.reduce(tail << shifts)
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> tuple[np.ndarray, bool]:
    """Inverse of :func:`pack_codes`: ``(codes, padding_is_zero)``.

    ``packed`` must hold exactly ``packed_size(count, bits)`` bytes; ``padding_is_zero`` tells
    whether the unused bits of the last byte are zero, as a canonical encoding requires.
    """
    if bits == 8:
        return packed.copy(), True
    if bits == 1:
        allbits = np.unpackbits(packed, bitorder="little")
        return allbits[:count], not allbits[count:].any()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((packed.size, per), dtype=np.uint8)
    for j in range(per):
        np.bitwise_and(packed >> (j * bits), mask, out=out[:, j])
    flat = out.reshape(-1)
    return flat[:count], not flat[count:].any()
