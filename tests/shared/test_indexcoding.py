from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.shared.indexcoding import (
    ALL,
    BITMAP,
    RAW,
    RICE,
    check_indices,
    decode_indices,
    encode_indices,
    index_section_bounds,
    raw_width,
)
from fedge.shared.wireerror import WireFormatError


def _round_trip(indices: np.ndarray, size: int) -> int:
    enc = encode_indices(indices, size)
    lo, hi = index_section_bounds(enc.coding, enc.param, indices.size, size)
    assert lo <= enc.data.size <= hi
    out = decode_indices(enc.coding, enc.param, enc.data, indices.size, size)
    if enc.coding == ALL:
        assert out is None
        np.testing.assert_array_equal(indices, np.arange(size))
    else:
        assert out is not None and out.dtype == np.int64
        np.testing.assert_array_equal(out, indices)
    return enc.coding


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=st.integers(0, 5000))
def test_round_trip_any_subset(data: st.DataObject, size: int) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1))
    density = data.draw(st.sampled_from([0.0, 0.0005, 0.01, 0.1, 0.3, 0.7, 1.0]))
    rng = np.random.default_rng(seed)
    indices = np.flatnonzero(rng.random(size) < density).astype(np.int64)
    _round_trip(indices, size)


@pytest.mark.parametrize(
    ("indices", "size", "coding"),
    [
        (np.arange(0, 10_000, 100), 10_000, RICE),
        (np.arange(0, 10_000, 2), 10_000, BITMAP),
        (np.arange(1, 10_000), 10_000, BITMAP),
        (np.arange(0, 9_000), 10_000, RICE),  # p = 0 Rice is this bitmap cut at 9000
        (np.array([100, 50_000]), 60_000, RAW),
        (np.arange(50), 50, ALL),
        (np.array([], dtype=np.int64), 10, RICE),
        (np.array([0]), 1, ALL),
        (np.array([2_000_000_000]), 1 << 31, RAW),
        (np.arange(0, 1 << 20, 1 << 10), 1 << 31, RICE),
    ],
)
def test_encoder_picks_the_smallest_coding(indices: np.ndarray, size: int, coding: int) -> None:
    assert _round_trip(indices.astype(np.int64), size) == coding


def test_rice_is_near_the_entropy_of_random_positions() -> None:
    """~log2(e/density) + 1.5 bits per index for uniformly random positions."""
    rng = np.random.default_rng(3)
    size = 1_000_000
    indices = np.sort(rng.choice(size, 10_000, replace=False)).astype(np.int64)
    enc = encode_indices(indices, size)
    assert enc.coding == RICE
    bits_per_index = enc.data.size * 8 / indices.size
    assert bits_per_index < np.log2(np.e / 0.01) + 1.5


def test_rice_bounds_for_extreme_gaps() -> None:
    size = (1 << 31) - 1
    indices = np.array([0, size - 1], dtype=np.int64)
    assert _round_trip(indices, size) in (RICE, RAW)


@pytest.mark.parametrize(
    ("indices", "size", "message"),
    [
        (np.array([3, 1]), 10, "strictly increasing"),
        (np.array([1, 1]), 10, "strictly increasing"),
        (np.array([10]), 10, r"\[0, 10\)"),
        (np.array([-1]), 10, r"\[0, 10\)"),
        (np.array([0.0]), 10, "integer"),
        (np.array([[0]]), 10, "1-D"),
    ],
)
def test_check_indices(indices: np.ndarray, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_indices(indices, size, what="t")


def test_decoders_reject_malformed_streams() -> None:
    rice = encode_indices(np.array([5, 9, 200], np.int64), 1000)
    assert rice.coding == RICE
    extra = np.concatenate([rice.data, np.zeros(1, np.uint8)])
    with pytest.raises(WireFormatError) as err:
        decode_indices(RICE, rice.param, extra, 3, 1000)
    assert err.value.code == "bad_index_coding"
    three = encode_indices(np.array([0, 1, 2], np.int64), 10)
    assert (three.coding, three.param, three.data.tolist()) == (RICE, 0, [0b111])
    with pytest.raises(WireFormatError) as err:
        decode_indices(RICE, 0, three.data, 2, 10)
    assert err.value.code == "count_mismatch"
    with pytest.raises(WireFormatError) as err:
        decode_indices(RICE, rice.param, rice.data, 3, 200)
    assert err.value.code == "index_out_of_range"
    with pytest.raises(WireFormatError) as err:
        index_section_bounds(9, 0, 1, 10)
    assert err.value.code == "unknown_encoding"


@pytest.mark.parametrize(
    ("size", "indices"),
    [
        (1 << 16, [0, 40_000, (1 << 16) - 1]),  # the largest tensor with u16 raw indices
        ((1 << 16) + 1, [0, 40_000, 1 << 16]),  # the smallest with u32 raw indices
        (10_000_000, [3, 70_000, 5_000_000, 9_999_999]),
        (1 << 31, [1, (1 << 31) - 1]),
        (10_000_000, list(range(0, 10_000_000, 997))),  # gaps of 996: p around 9-10
        (3_000_000_000, list(range(7, 3_000_000_000, 1 << 22))),  # gaps above 2**16
    ],
)
def test_large_sparse_tensors_round_trip(size: int, indices: list[int]) -> None:
    """Tensors past the u16 range, in the encoder's coding and in RAW (which the encoder
    rarely picks for them, but a decoder must read exactly)."""
    idx = np.array(indices, dtype=np.int64)
    enc = encode_indices(idx, size)
    lo, hi = index_section_bounds(enc.coding, enc.param, idx.size, size)
    assert lo <= enc.data.size <= hi
    out = decode_indices(enc.coding, enc.param, enc.data, idx.size, size)
    assert out is not None and out.dtype == np.int64
    np.testing.assert_array_equal(out, idx)
    width = 2 if size <= 1 << 16 else 4
    assert raw_width(size) == width
    raw = idx.astype(f"<u{width}").view(np.uint8)
    assert index_section_bounds(RAW, 0, idx.size, size) == (raw.size, raw.size)
    out = decode_indices(RAW, 0, raw, idx.size, size)
    assert out is not None and out.dtype == np.int64
    np.testing.assert_array_equal(out, idx)


def test_rice_parameter_above_16_bits_keeps_every_remainder_bit() -> None:
    size = 1 << 40
    rng = np.random.default_rng(5)
    gaps = rng.integers(1 << 20, 1 << 21, 500)
    idx = np.cumsum(gaps).astype(np.int64)
    enc = encode_indices(idx, size)
    assert enc.coding == RICE and enc.param > 16
    out = decode_indices(enc.coding, enc.param, enc.data, idx.size, size)
    assert out is not None
    np.testing.assert_array_equal(out, idx)


@pytest.mark.parametrize("size", [(1 << 16) + 1, 10_000_000])
def test_large_raw_index_out_of_range_is_refused(size: int) -> None:
    raw = np.array([5, size], dtype="<u4").view(np.uint8)
    with pytest.raises(WireFormatError) as err:
        decode_indices(RAW, 0, raw, 2, size)
    assert err.value.code == "index_out_of_range"
    assert str(err.value).endswith(f"index {size} >= size {size}")


# ------------------------------------------------------------------------------------------
# The encoder's choices and the decoders' errors, against the rules in the module docstring.


def _rice_size(gaps: np.ndarray, p: int) -> int:
    """Bytes of the Rice coding with parameter p: ceil(n p / 8) remainder bytes and
    ceil((sum(g >> p) + n) / 8) unary bytes."""
    n = gaps.size
    return -(-n * p // 8) + -(-(int((gaps >> p).sum()) + n) // 8)


def _expected_rice(gaps: np.ndarray) -> tuple[int, int]:
    """The documented parameter search: p0 = floor(log2(mean gap)) (0 below a mean of 1), the
    parameters p0 - 2 .. p0 + 1 within [0, 31], the smallest size, ties to the smaller p."""
    if gaps.size == 0:
        return 0, 0
    mean = float(gaps.mean())
    p0 = math.floor(math.log2(mean)) if mean >= 1 else 0
    sizes = [(_rice_size(gaps, p), p) for p in range(max(0, p0 - 2), min(31, p0 + 1) + 1)]
    size, p = min(sizes)
    return p, size


def _expected_coding(indices: np.ndarray, size: int) -> tuple[int, int, int]:
    """(coding, param, bytes): ALL for every index, else the smallest of bitmap, Rice and raw
    (ties: bitmap, then Rice)."""
    if indices.size == size:
        return ALL, 0, 0
    gaps = np.diff(indices, prepend=-1) - 1
    p, rice = _expected_rice(gaps)
    bitmap = -(-size // 8)
    raw = indices.size * (2 if size <= 1 << 16 else 4 if size <= 1 << 32 else 8)
    if bitmap <= rice and bitmap <= raw:
        return BITMAP, 0, bitmap
    if rice <= raw:
        return RICE, p, rice
    return RAW, 0, raw


@pytest.mark.parametrize(
    "gaps",
    [
        [3636],  # p0 = 11: p = 9 and p = 8 both take 3 bytes, the window starts at 9
        [119, 10, 89, 449, 41, 35, 130],  # p = 8 would be smaller; the window ends at p0 + 1 = 7
        [4187, 2210, 2521, 335, 616, 135, 1435, 6662, 5320, 7477],  # p = 11 and 12 tie
        [0, 0, 0],  # mean below 1: p = 0
        [],
    ],
)
def test_rice_parameter_is_searched_around_log2_of_the_mean_gap(gaps: list[int]) -> None:
    g = np.array(gaps, dtype=np.int64)
    indices = np.cumsum(g + 1) - 1
    size = 1 << 40  # 8-byte raw indices: Rice is the smallest
    enc = encode_indices(indices, size)
    p, nbytes = _expected_rice(g)
    assert (enc.coding, enc.param, enc.data.size) == (RICE, p, nbytes)
    out = decode_indices(RICE, enc.param, enc.data, indices.size, size)
    assert out is not None
    np.testing.assert_array_equal(out, indices)


def test_encoder_choice_matches_the_documented_sizes() -> None:
    """Many small random sets (where sizes tie often): coding, parameter and length are the
    documented ones, and every encoding decodes back."""
    rng = np.random.default_rng(21)
    for _ in range(3000):
        size = int(rng.choice([1, 2, 7, 8, 9, 16, 17, 40, 64, 100, 300, 70_000]))
        n = int(rng.integers(0, min(size, 12) + 1))
        indices = np.sort(rng.choice(size, n, replace=False)).astype(np.int64)
        enc = encode_indices(indices, size)
        coding, param, nbytes = _expected_coding(indices, size)
        assert (enc.coding, enc.param, enc.data.size) == (coding, param, nbytes), (indices, size)
        assert enc.data.dtype == np.uint8
        out = decode_indices(enc.coding, enc.param, enc.data, n, size)
        np.testing.assert_array_equal(np.arange(size) if out is None else out, indices)


@pytest.mark.parametrize(
    ("indices", "size", "sizes", "coding"),
    [
        ([15], 16, (2, 2, 2), BITMAP),  # bitmap, Rice (p = 3) and raw all 2 bytes
        ([0, 3, 5, 13, 18, 21, 22], 24, (3, 3, 14), BITMAP),
        ([29], 40, (5, 2, 2), RICE),  # Rice p = 2: 1 remainder byte + 1 unary byte (8 bits)
    ],
)
def test_ties_between_codings(
    indices: list[int], size: int, sizes: tuple[int, int, int], coding: int
) -> None:
    """Equal sizes go to the bitmap, then to Rice (bitmap, Rice, raw bytes as given)."""
    idx = np.array(indices, dtype=np.int64)
    gaps = np.diff(idx, prepend=-1) - 1
    assert (-(-size // 8), _expected_rice(gaps)[1], 2 * idx.size) == sizes
    enc = encode_indices(idx, size)
    assert enc.coding == coding and enc.data.size == sizes[0 if coding == BITMAP else 1]


def _u8(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint8)


def _raw16(values: list[int]) -> np.ndarray:
    return np.array(values, dtype="<u2").view(np.uint8)


@pytest.mark.parametrize(
    ("coding", "param", "data", "count", "size", "code", "detail"),
    [
        (RAW, 0, _raw16([10]), 1, 10, "index_out_of_range", "index 10 >= size 10"),
        (RAW, 0, _raw16([1, 1, 0]), 3, 10, "indices_not_sorted", "index 2 is smaller than index 1"),
        (RAW, 0, _raw16([4, 6, 5]), 3, 10, "indices_not_sorted", "index 2 is smaller than index 1"),
        (RAW, 0, _raw16([1, 2, 2]), 3, 10, "duplicate_index", "index 2 occurs twice"),
        (
            BITMAP, 0, _u8([0x01, 0x80]), 1, 10,
            "bad_index_coding", "bitmap padding bits are not zero",
        ),
        (
            BITMAP, 0, _u8([0x03, 0x00]), 1, 10,
            "count_mismatch", "bitmap holds 2 indices, 1 declared",
        ),
        # p = 3, one index: a remainder byte with bit 7 set past the 3 bits, then unary "1".
        (
            RICE, 3, _u8([0x80, 0x01]), 1, 100,
            "bad_index_coding", "Rice remainder padding bits are not zero",
        ),
        (
            RICE, 0, _u8([0x07, 0x00]), 3, 10,
            "bad_index_coding", "Rice unary stream has spare bytes at its end",
        ),
        (RICE, 0, _u8([0x07]), 2, 10, "count_mismatch", "Rice stream holds 3 indices, 2 declared"),
        # p = 2, quotient 3: a gap of at least 12 in a tensor of 10.
        (
            RICE, 2, _u8([0x00, 0x08]), 1, 10,
            "index_out_of_range", "a Rice gap exceeds the tensor size 10",
        ),
        # p = 0, quotient 10: a gap of exactly the tensor size.
        (
            RICE, 0, _u8([0x00, 0x04]), 1, 10,
            "index_out_of_range", "a Rice gap exceeds the tensor size 10",
        ),
        # p = 0, indices 0, 5, 11 (gaps 0, 4, 5: each below the size, the last index is not).
        (RICE, 0, _u8([0x21, 0x08]), 3, 10, "index_out_of_range", "index 11 >= size 10"),
    ],
)  # fmt: skip
def test_decoder_errors_say_what_is_wrong(
    coding: int, param: int, data: np.ndarray, count: int, size: int, code: str, detail: str
) -> None:
    with pytest.raises(WireFormatError) as err:
        decode_indices(coding, param, data, count, size)
    assert (err.value.code, err.value.detail) == (code, detail)


@pytest.mark.parametrize(
    ("args", "code", "detail"),
    [
        ((ALL, 0, 3, 4), "bad_descriptor", "dense coding needs 4 values, 3 declared"),
        ((9, 0, 1, 10), "unknown_encoding", "unknown index coding 9"),
        ((BITMAP, 1, 1, 10), "bad_descriptor", "index coding 2 takes no parameter"),
        ((RAW, 2, 1, 10), "bad_descriptor", "index coding 3 takes no parameter"),
        ((RICE, 32, 1, 10), "bad_index_coding", "Rice parameter 32 > 31"),
    ],
)
def test_section_bounds_refuse_bad_descriptors(
    args: tuple[int, int, int, int], code: str, detail: str
) -> None:
    with pytest.raises(WireFormatError) as err:
        index_section_bounds(*args)
    assert (err.value.code, err.value.detail) == (code, detail)


@pytest.mark.parametrize(
    ("args", "bounds"),
    [
        ((ALL, 0, 4, 4), (0, 0)),
        ((RICE, 0, 0, 10), (0, 0)),
        ((RICE, 5, 0, 10), (0, 0)),
        ((BITMAP, 0, 3, 17), (3, 3)),
        ((RAW, 0, 3, 70_000), (12, 12)),
        # ceil(31 / 8) = 4 remainder bytes and one unary byte whatever the gap.
        ((RICE, 31, 1, 10), (5, 5)),
        # 10 indices, p = 2: 3 remainder bytes; unary 10 ones (2 bytes) up to 10 + 90 >> 2 = 32
        # bits (4 bytes).
        ((RICE, 2, 10, 100), (5, 7)),
    ],
)
def test_section_bounds(args: tuple[int, int, int, int], bounds: tuple[int, int]) -> None:
    assert index_section_bounds(*args) == bounds


def test_raw_decoder_of_no_indices_and_dense_encoding() -> None:
    out = decode_indices(RAW, 0, np.empty(0, np.uint8), 0, 10)
    assert out is not None and out.size == 0 and out.dtype == np.int64
    enc = encode_indices(np.arange(5, dtype=np.int64), 5)
    assert (enc.coding, enc.param, enc.data.size, enc.data.dtype) == (ALL, 0, 0, np.uint8)


@pytest.mark.parametrize(
    ("size", "width"),
    [(1, 2), (1 << 16, 2), ((1 << 16) + 1, 4), (1 << 32, 4), ((1 << 32) + 1, 8), (1 << 40, 8)],
)
def test_raw_width(size: int, width: int) -> None:
    assert raw_width(size) == width


def test_rice_parameter_of_17_bits_keeps_the_top_remainder_bit() -> None:
    """Gaps in [2**17, 2**18) with their bit 16 set: p = 17 needs 17-bit remainders."""
    rng = np.random.default_rng(17)
    gaps = rng.integers(1 << 17, 1 << 18, 300) | (1 << 16)
    idx = np.cumsum(gaps).astype(np.int64)
    enc = encode_indices(idx, 1 << 40)
    assert (enc.coding, enc.param) == (RICE, 17)
    out = decode_indices(RICE, enc.param, enc.data, idx.size, 1 << 40)
    assert out is not None
    np.testing.assert_array_equal(out, idx)
