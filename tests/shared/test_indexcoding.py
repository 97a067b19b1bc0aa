from __future__ import annotations

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
