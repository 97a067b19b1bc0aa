"""Coding of the sorted flat indices of a sparse tensor.

The encoder computes the size of every coding and keeps the smallest; ties go to the bitmap
(fastest to decode), then Rice:

``RICE``
    Golomb-Rice coded gaps ``g_0 = i_0``, ``g_j = i_j - i_{j-1} - 1`` with a per-tensor
    parameter ``p``: of ``p0 - 2 .. p0 + 1`` (within ``[0, 31]``, ``p0 = floor(log2(mean
    gap))``, 0 below a mean of 1) the one giving the fewest bytes, the smaller on a tie. Two bit
    streams, both little bit order: first the ``p``-bit remainders ``g & (2^p - 1)`` (LSB
    first, ``ceil(n p / 8)`` bytes), then the quotients ``g >> p`` in unary (``q`` zeros and a
    one). Decoding is vectorized: the positions of the ones give the quotients through a
    difference, the remainders come from reshaping the first stream to ``(n, p)`` bits.
``BITMAP``
    ``ceil(size / 8)`` bytes, bit ``i`` set when index ``i`` is present (``np.packbits``).
    Rice with ``p = 0`` is the same bitmap cut after the last index, so the bitmap never beats
    Rice by more than rounding; it is kept because it ties in the dense regime and decodes
    with fewer passes (``unpackbits`` + ``flatnonzero``, no cumulative sum).
``RAW``
    Little-endian u16 (tensors up to 65536 elements) or u32 indices. Smallest only for a handful
    of indices in a small tensor; the decoder checks order and uniqueness explicitly.
``ALL``
    Every index, nothing stored (a dense tensor).

Decoders check that the stream holds exactly the declared number of indices, that every index
is below the tensor size, that padding bits are zero and that the stream has no spare bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.shared.wireerror import WireFormatError

__all__ = [
    "ALL",
    "BITMAP",
    "CODING_NAMES",
    "RAW",
    "RICE",
    "EncodedIndices",
    "check_indices",
    "decode_indices",
    "encode_indices",
    "index_section_bounds",
    "raw_width",
]

ALL, RICE, BITMAP, RAW = 0, 1, 2, 3
CODING_NAMES = {ALL: "all", RICE: "rice", BITMAP: "bitmap", RAW: "raw"}

#: Largest Rice parameter (gaps are below the tensor size, itself below 2**31).
MAX_RICE_PARAM = 31


@dataclass(frozen=True, eq=False)
class EncodedIndices:
    coding: int
    param: int
    data: np.ndarray  # uint8


def raw_width(size: int) -> int:
    """Bytes per index of the RAW coding for a tensor of ``size`` elements."""
    return 2 if size <= 1 << 16 else 4 if size <= 1 << 32 else 8


def check_indices(indices: np.ndarray, size: int, *, what: str) -> None:
    """``ValueError`` unless ``indices`` is a 1-D strictly increasing integer array in range."""
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{what}: indices must be a 1-D integer array")
    if indices.size:
        if indices[0] < 0 or indices[-1] >= size:
            raise ValueError(f"{what}: indices must lie in [0, {size})")
        if indices.size > 1 and not (np.diff(indices) > 0).all():
            raise ValueError(f"{what}: indices must be strictly increasing")


def _rice_bytes(quotient_sum: int, n: int, p: int) -> int:
    return (n * p + 7) // 8 + (quotient_sum + n + 7) // 8


def _best_rice_param(gaps: np.ndarray) -> tuple[int, int]:
    n = gaps.size
    if n == 0:
        return 0, 0
    mean = float(gaps.mean())
    p0 = int(math.log2(mean)) if mean >= 1.0 else 0
    best: tuple[int, int] | None = None
    for p in range(max(0, p0 - 2), min(MAX_RICE_PARAM, p0 + 1) + 1):
        size = _rice_bytes(int((gaps >> p).sum()), n, p)
        if best is None or size < best[1]:
            best = (p, size)
    assert best is not None
    return best


def _encode_rice(gaps: np.ndarray, p: int) -> np.ndarray:
    n = gaps.size
    parts: list[np.ndarray] = []
    if p:
        dtype = np.uint8 if p <= 8 else np.uint16 if p <= 16 else np.uint32
        rem = (gaps & ((1 << p) - 1)).astype(dtype)
        bits = (np.right_shift(rem[:, None], np.arange(p, dtype=dtype)) & 1).astype(np.uint8)
        parts.append(np.packbits(bits.reshape(-1), bitorder="little"))
    quotients = gaps >> p
    unary = np.zeros(int(quotients.sum()) + n, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 1
    parts.append(np.packbits(unary, bitorder="little"))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def encode_indices(indices: np.ndarray, size: int) -> EncodedIndices:
    """Smallest coding of sorted unique int64 ``indices`` into a tensor of ``size`` elements."""
    n = indices.size
    if n == size:
        return EncodedIndices(ALL, 0, np.empty(0, dtype=np.uint8))
    gaps = np.diff(indices, prepend=-1) - 1
    p, rice_size = _best_rice_param(gaps)
    bitmap_size = (size + 7) // 8
    raw_size = n * raw_width(size)
    if bitmap_size <= rice_size and bitmap_size <= raw_size:
        mask = np.zeros(size, dtype=np.uint8)
        mask[indices] = 1
        return EncodedIndices(BITMAP, 0, np.packbits(mask, bitorder="little"))
    if rice_size <= raw_size:
        return EncodedIndices(RICE, p, _encode_rice(gaps, p))
    width = raw_width(size)
    return EncodedIndices(RAW, 0, indices.astype(f"<u{width}").view(np.uint8))


def index_section_bounds(coding: int, param: int, count: int, size: int) -> tuple[int, int]:
    """Smallest and largest byte length a canonical section of this coding can have.

    Raises ``WireFormatError`` for an unknown coding or a parameter it does not allow.
    """
    if coding == ALL:
        if count != size:
            raise WireFormatError(
                "bad_descriptor", f"dense coding needs {size} values, {count} declared"
            )
        return 0, 0
    if coding not in CODING_NAMES:
        raise WireFormatError("unknown_encoding", f"unknown index coding {coding}")
    if coding != RICE and param != 0:
        raise WireFormatError("bad_descriptor", f"index coding {coding} takes no parameter")
    if coding == BITMAP:
        n = (size + 7) // 8
        return n, n
    if coding == RAW:
        n = count * raw_width(size)
        return n, n
    if param > MAX_RICE_PARAM:
        raise WireFormatError("bad_index_coding", f"Rice parameter {param} > {MAX_RICE_PARAM}")
    if count == 0:
        return 0, 0
    rem = (count * param + 7) // 8
    return rem + (count + 7) // 8, rem + (count + ((size - count) >> param) + 7) // 8


def decode_indices(
    coding: int, param: int, data: np.ndarray, count: int, size: int
) -> np.ndarray | None:
    """Decode and validate an index section (``None`` for ``ALL``), int64 flat indices.

    The caller has checked ``len(data)`` against :func:`index_section_bounds`.
    """
    if coding == ALL:
        return None
    if coding == BITMAP:
        bits = np.unpackbits(data, bitorder="little")
        if bits[size:].any():
            raise WireFormatError("bad_index_coding", "bitmap padding bits are not zero")
        idx = np.flatnonzero(bits[:size]).astype(np.int64, copy=False)
        if idx.size != count:
            raise WireFormatError(
                "count_mismatch", f"bitmap holds {idx.size} indices, {count} declared"
            )
        return idx
    if coding == RAW:
        idx = data.view(f"<u{raw_width(size)}").astype(np.int64)
        _check_raw(idx, size)
        return idx
    return _decode_rice(data, param, count, size)


def _check_raw(idx: np.ndarray, size: int) -> None:
    if idx.size == 0:
        return
    if int(idx.max()) >= size:
        raise WireFormatError("index_out_of_range", f"index {int(idx.max())} >= size {size}")
    steps = np.diff(idx)
    if (steps < 0).any():
        at = int(np.flatnonzero(steps < 0)[0])
        raise WireFormatError("indices_not_sorted", f"index {at + 1} is smaller than index {at}")
    if (steps == 0).any():
        at = int(np.flatnonzero(steps == 0)[0])
        raise WireFormatError("duplicate_index", f"index {int(idx[at])} occurs twice")


def _decode_rice(data: np.ndarray, p: int, count: int, size: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=np.int64)
    rem_len = (count * p + 7) // 8
    remainders = np.zeros(count, dtype=np.int64)
    if p:
        bits = np.unpackbits(data[:rem_len], bitorder="little")
        if bits[count * p :].any():
            raise WireFormatError("bad_index_coding", "Rice remainder padding bits are not zero")
        fields = bits[: count * p].reshape(count, p)
        for j in range(p):
            remainders |= fields[:, j].astype(np.int64) << j
    unary = data[rem_len:]
    ends = np.flatnonzero(np.unpackbits(unary, bitorder="little"))
    if ends.size != count:
        raise WireFormatError(
            "count_mismatch", f"Rice stream holds {ends.size} indices, {count} declared"
        )
    if unary.size != int(ends[-1]) // 8 + 1:
        raise WireFormatError("bad_index_coding", "Rice unary stream has spare bytes at its end")
    quotients = np.diff(ends, prepend=-1) - 1
    if int(quotients.max()) << p >= size:
        raise WireFormatError("index_out_of_range", f"a Rice gap exceeds the tensor size {size}")
    idx = np.cumsum((quotients << p) + remainders + 1) - 1
    if int(idx[-1]) >= size:
        raise WireFormatError("index_out_of_range", f"index {int(idx[-1])} >= size {size}")
    return idx
