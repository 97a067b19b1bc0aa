"""The stochastic quantizer: unbiasedness, its variance bound, and code packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.shared.quantize import (
    QUANT_BITS,
    chunk_scales,
    dequantize,
    half_levels,
    level_table,
    max_code,
    pack_codes,
    packed_size,
    quantize,
    uniform_u32,
    unpack_codes,
)

CHUNK = 128


def _test_vector() -> np.ndarray:
    """300 values = two full chunks and a short one, with zeros, extremes, tiny and grid values."""
    rng = np.random.default_rng(1234)
    v = rng.standard_normal(300).astype(np.float32)
    v[:10] = 0.0
    v[10] = 5.0
    v[11] = -5.0
    v[12:20] = 1e-3
    v[200] = 0.0
    v[290:300] = [-0.7, 0.7, 0.1, -0.1, 0.0, 2.0, -2.0, 0.33, 1.5, -1.25]
    return v


#: The grid's s for each bit width, from the scheme in quantize's docstring (not from the code
#: under test): 2**(b-1) - 1 levels on each side of zero, 1/2 for the one-bit grid {-m, m}.
HALF_LEVELS = {1: 0.5, 2: 1.0, 4: 7.0, 8: 127.0}


def _scales(v: np.ndarray, chunk: int) -> np.ndarray:
    """max |v_i| of each chunk (the last one may be shorter), one value per element (float64)."""
    padded = np.zeros(-(-v.size // chunk) * chunk)
    padded[: v.size] = np.abs(v.astype(np.float64))
    return np.repeat(padded.reshape(-1, chunk).max(axis=1), chunk)[: v.size]


def _exact_error_variance(v: np.ndarray, bits: int, chunk: int) -> np.ndarray:
    """Per-value variance D^2 p (1 - p) of the scheme in quantize's docstring (float64)."""
    s = HALF_LEVELS[bits]
    scales = _scales(v, chunk)
    step = np.where(scales > 0, scales / s, 0.0)
    y = np.where(scales > 0, v / np.where(scales > 0, scales, 1.0), 0.0) * s + s
    p = y - np.floor(y)
    return step**2 * p * (1 - p)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_quantizer_is_unbiased(bits: int) -> None:
    """Mean over many seeded draws is within 5 standard errors of every coordinate."""
    v = _test_vector()
    draws = 3000
    rng = np.random.default_rng(2024 + bits)
    total = np.zeros(v.size)
    for _ in range(draws):
        total += dequantize(quantize(v, bits=bits, chunk=CHUNK, rng=rng))
    mean = total / draws
    se = np.sqrt(_exact_error_variance(v, bits, CHUNK) / draws)
    # Float32 rounding of levels/scales is ~1e-7 relative; allow that on top of 5 SE.
    tolerance = 5 * se + 1e-6 * np.abs(v).max()
    assert np.all(np.abs(mean - v) <= tolerance), np.max(np.abs(mean - v) / (se + 1e-12))
    # The draws really are random where a value is not on the grid.
    assert np.count_nonzero(se) > 200


@pytest.mark.parametrize(
    "bit_generator", [np.random.PCG64, np.random.MT19937, np.random.Philox, np.random.SFC64]
)
def test_uniform_draws_for_every_bit_generator(bit_generator: type) -> None:
    """Raw 64-bit outputs are split in two; 32-bit generators go through rng.integers."""
    rng = np.random.Generator(bit_generator(3))
    u = uniform_u32(rng, 200_001)
    assert u.dtype == np.uint32 and u.size == 200_001
    # Each of the 32 bits is set half of the time (5 standard errors).
    ones = ((u[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(u.size))
    v = _test_vector()
    draws = [dequantize(quantize(v, bits=1, chunk=CHUNK, rng=rng)) for _ in range(2000)]
    mean = np.mean(draws, axis=0, dtype=np.float64)
    se = np.sqrt(_exact_error_variance(v, 1, CHUNK) / 2000)
    assert np.all(np.abs(mean - v) <= 5 * se + 1e-6 * np.abs(v).max())


def _chunks_to_check(d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(99)
    spike = np.zeros(d, np.float32)
    spike[3] = 2.0
    plus_minus = np.zeros(d, np.float32)
    plus_minus[:2] = [1.0, -1.0]
    return {
        "normal": rng.standard_normal(d).astype(np.float32),
        "uniform": rng.uniform(-1, 1, d).astype(np.float32),
        "spike": spike,
        "plus_minus": plus_minus,
        "constant": np.full(d, 0.3, np.float32),
        "heavy_tail": rng.standard_t(1.5, d).astype(np.float32),
    }


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("d", [16, 256])
def test_variance_bound(bits: int, d: int) -> None:
    """E||Q(v) - v||^2 per chunk obeys the bound in the quantize module docstring.

    Bits >= 2: QSGD's min(d/s^2, sqrt(d)/s) ||v||^2 with s = 2**(b-1) - 1 levels per side.
    One bit: exactly d m^2 - ||v||^2 <= (d - 1) ||v||^2 (QSGD's d/s^2 with s = 1).
    The exact expectation is also checked against an empirical average over seeded draws.
    """
    rng = np.random.default_rng(5 + bits + d)
    draws = 400
    for name, v in _chunks_to_check(d).items():
        norm2 = float(np.dot(v.astype(np.float64), v))
        exact = float(_exact_error_variance(v, bits, d).sum())
        if bits == 1:
            m = float(np.abs(v).max())
            assert exact == pytest.approx(d * m * m - norm2, rel=1e-5, abs=1e-9), name
            bound = (d - 1) * norm2
        else:
            s = HALF_LEVELS[bits]
            bound = min(d / s**2, math.sqrt(d) / s) * norm2
        assert exact <= bound * (1 + 1e-6) + 1e-12, (name, exact, bound)
        errors = np.empty(draws)
        for i in range(draws):
            e = dequantize(quantize(v, bits=bits, chunk=d, rng=rng)).astype(np.float64) - v
            errors[i] = np.dot(e, e)
        se = errors.std() / math.sqrt(draws) + 1e-12
        assert abs(errors.mean() - exact) <= 5 * se + 1e-6 * norm2, (name, errors.mean(), exact)


def test_one_bit_cannot_meet_sqrt_branch() -> None:
    """Documented limitation: for (m, -m, 0, ...) the one-bit error exceeds sqrt(d) ||v||^2."""
    d = 256
    v = np.zeros(d, np.float32)
    v[:2] = [1.0, -1.0]
    exact = float(_exact_error_variance(v, 1, d).sum())
    assert exact == pytest.approx(d - 2)
    assert exact > math.sqrt(d) / 0.5 * 2.0  # sqrt(d)/s ||v||^2 with s = 1/2, ||v||^2 = 2


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_codes_scales_and_levels(bits: int) -> None:
    v = _test_vector()
    q = quantize(v, bits=bits, chunk=CHUNK, rng=np.random.default_rng(0))
    assert q.codes.dtype == np.uint8 and q.codes.shape == v.shape
    assert q.codes.max() <= max_code(bits) == 2 * HALF_LEVELS[bits]
    np.testing.assert_array_equal(q.scales, [np.abs(v[i : i + CHUNK]).max() for i in (0, 128, 256)])
    np.testing.assert_array_equal(chunk_scales(v, CHUNK), q.scales)
    assert q.scales.dtype == np.float32 and chunk_scales(v, CHUNK).dtype == np.float32
    out = dequantize(q)
    assert out.dtype == np.float32
    assert np.all(np.abs(out) <= np.repeat(q.scales, CHUNK)[: v.size])
    # Values already on the grid (here: +-m, and 0 for bits >= 2) are reproduced exactly.
    assert out[10] == 5.0 and out[11] == -5.0
    if bits >= 2:
        np.testing.assert_array_equal(out[:10], 0.0)


@pytest.mark.parametrize(("bits", "chunk"), [(4, 1000), (1, 256), (8, 3)])
def test_large_input_spans_blocks(bits: int, chunk: int) -> None:
    """Inputs longer than one internal block: every code is floor(y) or floor(y) + 1 and
    dequantization matches the elementwise definition."""
    rng = np.random.default_rng(bits)
    v = rng.standard_normal(3 * (1 << 18) + 17).astype(np.float32)
    q = quantize(v, bits=bits, chunk=chunk, rng=rng)
    s = HALF_LEVELS[bits]
    np.testing.assert_array_equal(q.scales, _scales(v, chunk)[::chunk].astype(np.float32))
    scale = _scales(v, chunk)
    y = v / scale * s + s
    assert np.all((q.codes == np.floor(y)) | (q.codes == np.floor(y) + 1))
    expected = ((q.codes.astype(np.float64) - s) / s) * scale
    np.testing.assert_allclose(dequantize(q), expected, rtol=1e-6, atol=0)
    # Rounded up about as often as the fractional parts say (a loose check of the draws).
    frac = y - np.floor(y)
    up = q.codes > np.floor(y)
    assert abs(up.mean() - frac.mean()) < 5 * np.sqrt(0.25 / v.size)


def test_zero_chunk_and_empty_input() -> None:
    rng = np.random.default_rng(0)
    for bits in QUANT_BITS:
        q = quantize(np.zeros(10, np.float32), bits=bits, chunk=4, rng=rng)
        np.testing.assert_array_equal(q.scales, 0.0)
        np.testing.assert_array_equal(dequantize(q), 0.0)
        e = quantize(np.zeros(0, np.float32), bits=bits, chunk=4, rng=rng)
        assert e.codes.size == 0 and e.scales.size == 0 and dequantize(e).size == 0


def test_extreme_magnitudes_do_not_overflow() -> None:
    v = np.array([3.4e38, -3.4e38, 1e-45, 0.0, 1e38], np.float32)
    for bits in QUANT_BITS:
        out = dequantize(quantize(v, bits=bits, chunk=2, rng=np.random.default_rng(1)))
        assert np.isfinite(out).all()
        tiny = dequantize(quantize(v[2:3], bits=bits, chunk=1, rng=np.random.default_rng(1)))
        assert np.isfinite(tiny).all()


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_same_seed_same_codes(bits: int) -> None:
    v = _test_vector()
    a = quantize(v, bits=bits, chunk=CHUNK, rng=np.random.default_rng(42))
    b = quantize(v, bits=bits, chunk=CHUNK, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(a.codes, b.codes)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from(QUANT_BITS),
    n=st.integers(0, 70),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, max_code(bits) + 1, n).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(n, bits)
    back, padding_zero = unpack_codes(packed, bits, n)
    assert padding_zero
    np.testing.assert_array_equal(back, codes)


def test_pack_layout_is_lsb_first() -> None:
    assert pack_codes(np.array([1, 2, 3], np.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(np.array([1, 14, 5], np.uint8), 4).tolist() == [1 | 14 << 4, 5]
    assert pack_codes(np.array([1, 0, 1], np.uint8), 1).tolist() == [0b101]
    _, padding_zero = unpack_codes(np.array([0b1000_0001], np.uint8), 1, 3)
    assert not padding_zero


def test_invalid_bits_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(np.zeros(3, np.float32), bits=3, chunk=2, rng=np.random.default_rng(0))


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_grid_constants(bits: int) -> None:
    """s, the largest code and the level table, against the scheme in the docstring."""
    s = HALF_LEVELS[bits]
    assert half_levels(bits) == s
    assert max_code(bits) == int(2 * s)
    levels = level_table(bits)
    assert levels.dtype == np.float32 and levels.size == int(2 * s) + 1
    np.testing.assert_allclose(levels, (np.arange(int(2 * s) + 1) - s) / s, rtol=0, atol=1e-7)
    assert levels[0] == -1.0 and levels[-1] == 1.0


@pytest.mark.parametrize(
    ("count", "bits", "size"),
    [(0, 1, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 2, 1), (5, 2, 2), (3, 4, 2), (3, 8, 3)],
)
def test_packed_size(count: int, bits: int, size: int) -> None:
    assert packed_size(count, bits) == size


@pytest.mark.parametrize("chunk", [0, -1])
def test_invalid_chunk_rejected(chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        quantize(np.zeros(3, np.float32), bits=2, chunk=chunk, rng=np.random.default_rng(0))


@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_reports_nonzero_padding(bits: int) -> None:
    codes = np.array([1, 1, 1], np.uint8)
    packed = pack_codes(codes, bits)
    back, zero = unpack_codes(packed, bits, 3)
    assert zero and back.tolist() == [1, 1, 1]
    packed[-1] |= np.uint8(1 << (8 - bits))  # a code in the unused top position
    back, zero = unpack_codes(packed, bits, 3)
    assert not zero and back.tolist() == [1, 1, 1]


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_pack_accepts_any_integer_codes_and_unpacks_uint8(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, max_code(bits) + 1, 37)
    packed = pack_codes(codes, bits)  # int64 codes, as a caller may hold them
    np.testing.assert_array_equal(packed, pack_codes(codes.astype(np.uint8), bits))
    back, zero = unpack_codes(packed, bits, codes.size)
    assert back.dtype == np.uint8 and zero
    np.testing.assert_array_equal(back, codes)


def test_multidimensional_input_is_quantized_flat() -> None:
    """Any shape is quantized as its flattened values, chunks running across rows."""
    rng = np.random.default_rng(8)
    v = rng.standard_normal((3, 100)).astype(np.float32)
    q = quantize(v, bits=4, chunk=64, rng=rng)
    flat = v.reshape(-1)
    assert q.codes.shape == (300,)
    np.testing.assert_array_equal(q.scales, _scales(flat, 64)[::64].astype(np.float32))
    y = flat / _scales(flat, 64) * HALF_LEVELS[4] + HALF_LEVELS[4]
    assert np.all((q.codes == np.floor(y)) | (q.codes == np.floor(y) + 1))


def _raw_halves(bit_generator: np.random.BitGenerator, outputs: int) -> np.ndarray:
    """The uint32 stream the quantizer documents for a 64-bit generator: each raw output
    split in two, the low half first."""
    raw = bit_generator.random_raw(outputs)
    return np.stack([raw & 0xFFFF_FFFF, raw >> 32], axis=1).reshape(-1).astype(np.uint32)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8])
def test_uniform_u32_splits_raw_64_bit_outputs(n: int) -> None:
    """Two draws per raw output of a 64-bit generator, and exactly ceil(n / 2) outputs used."""
    rng = np.random.Generator(np.random.PCG64(11))
    u = uniform_u32(rng, n)
    reference = np.random.PCG64(11)
    expected = _raw_halves(reference, (n + 1) // 2)
    assert u.dtype == np.uint32
    np.testing.assert_array_equal(u, expected[:n])
    # The generator is left where the reference is: the next call starts at the next raw
    # output (the unused half of an odd count is dropped), and so does the next raw output.
    np.testing.assert_array_equal(uniform_u32(rng, 2), _raw_halves(reference, 1))
    assert rng.bit_generator.random_raw() == reference.random_raw()


def test_uniform_u32_of_a_32_bit_generator_is_its_raw_output() -> None:
    """MT19937 outputs 32 uniform bits at a time: every draw is one raw output."""
    u = uniform_u32(np.random.Generator(np.random.MT19937(11)), 1000)
    expected = np.random.MT19937(11).random_raw(1000)
    assert u.dtype == np.uint32
    np.testing.assert_array_equal(u, expected.astype(np.uint32))


def test_a_raw_zero_of_a_32_bit_generator_is_drawn_as_zero() -> None:
    """The draws cover all of [0, 2**32): an MT19937 whose next output is 0 (a state word of 0
    tempers to 0) gives 0, then its following outputs."""
    state = np.random.MT19937(5).state
    key = state["state"]["key"].copy()
    key[0] = 0
    state["state"] = {"key": key, "pos": 0}
    bit_generator = np.random.MT19937()
    bit_generator.state = state
    reference = np.random.MT19937()
    reference.state = state
    expected = reference.random_raw(3)
    assert expected[0] == 0
    u = uniform_u32(np.random.Generator(bit_generator), 3)
    np.testing.assert_array_equal(u, expected.astype(np.uint32))


def _first_draw(seed: int) -> int:
    """The uint32 the quantizer compares with the first value's threshold under a PCG64
    generator seeded with ``seed``: the low half of its first raw output."""
    return int(np.random.PCG64(seed).random_raw(1)[0] & 0xFFFF_FFFF)


def test_rounding_up_needs_a_draw_strictly_below_the_threshold() -> None:
    """One bit, scale 1: a value ``x = 2p - 1`` has y = p exactly (a multiple of 2**-25), and
    rounds up when the draw u < p * 2**32. Seed 1079 draws u = 439060992 = 128 k first, so
    p = u / 2**32 keeps the value down (u == threshold) and the next float32 above rounds it
    up."""
    seed, u = 1079, _first_draw(1079)
    assert u == 439060992 and u % 128 == 0
    k = u // 128
    at = np.float32(-1.0 + k * 2.0**-24)
    above = np.float32(-1.0 + (k + 1) * 2.0**-24)
    assert float(at) == -1.0 + k * 2.0**-24 and float(above) == -1.0 + (k + 1) * 2.0**-24
    for x, code in ((at, 0), (above, 1)):
        q = quantize(
            np.array([x, 1.0], np.float32), bits=1, chunk=2, rng=np.random.default_rng(seed)
        )
        assert q.codes[0] == code, (x, code)


def test_a_float64_input_is_rounded_to_float32_first() -> None:
    """For x = -(3 - i 2**-22), m = 3 and one bit, y = f32(x / 3) / 2 + 1/2 and seed 30 draws u
    between its threshold and the one of the exact quotient, so the value stays down. A
    float64 input 0.45 ulp above that float32 is rounded to it first and gets the same code
    (its own quotient would round the value up)."""
    seed, u = 30, _first_draw(30)
    assert u == 454047394
    i = 3 * (u // 512) + 1
    x = np.float32(-(3.0 - i * 2.0**-22))
    assert float(x) == -(3.0 - i * 2.0**-22)
    f32 = np.float32
    y = f32(f32(x / f32(3.0)) * f32(0.5)) + f32(0.5)  # float32 arithmetic, step by step
    assert math.floor(float(y) * 2**32) <= u < math.floor((float(x) / 3.0 * 0.5 + 0.5) * 2**32)
    q = quantize(np.array([x, 3.0], np.float32), bits=1, chunk=2, rng=np.random.default_rng(seed))
    assert q.codes[0] == 0
    x64 = float(x) + 0.45 * 2.0**-22
    assert np.float32(x64) == x
    y64 = f32(f32(x64 / 3.0) * f32(0.5)) + f32(0.5)
    assert u < math.floor(float(y64) * 2**32)
    q = quantize(np.array([x64, 3.0]), bits=1, chunk=2, rng=np.random.default_rng(seed))
    assert q.codes[0] == 0


def test_y_is_computed_in_float32() -> None:
    """The scheme's y is a float32: with four bits (s = 7), scale 1 and x = -1 + k 2**-24,
    y = f32(f32(7 x) + 7), whose threshold is 193 units of 2**-32 below that of the exact
    7 x + 7; seed 2 draws u between the two, so the value stays down."""
    seed, u = 2, _first_draw(2)
    assert u == 3597359297
    k = 2007455
    x = np.float32(-1.0 + k * 2.0**-24)
    assert float(x) == -1.0 + k * 2.0**-24
    f32 = np.float32
    y = f32(f32(x * f32(7.0)) + f32(7.0))
    assert math.floor(float(y) * 2**32) <= u < math.floor((float(x) * 7.0 + 7.0) * 2**32)
    q = quantize(np.array([x, 1.0], np.float32), bits=4, chunk=2, rng=np.random.default_rng(seed))
    assert q.codes.tolist() == [0, 14]
