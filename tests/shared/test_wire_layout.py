"""The byte layout (the one format version): pinned vectors, fixed overhead, varints, the
top-k fraction, header fields and descriptors."""

from __future__ import annotations

import tracemalloc
from typing import TypedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.shared import architectures
from fedge.shared.compression import CompressedUpdate, compress, decompress
from fedge.shared.indexcoding import BITMAP, RAW, RICE, index_section_bounds
from fedge.shared.limits import Limits
from fedge.shared.policy import DENSE, CompressionPolicy
from fedge.shared.wire import (
    WireFormatError,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    peek_update_header,
    update_overhead_bytes,
)
from fedge.shared.wirelayout import (
    FORMAT_VERSION,
    MAX_FRACTION_EXPONENT,
    VALUE_QUANT,
    Reader,
    as_bytes_view,
    encode_fraction,
    encode_varint,
    fraction_parts,
)
from tests.shared.wirecraft import RawTensor, descriptors_of, update_blob, var

# ------------------------------------------------------------------ pinned vectors
# What encode_update / encode_model write for the inputs rebuilt by _mlp_update(),
# _small_dense_update() and MODEL below. A change of these bytes is a change of the format.

MLP_BLOB = bytes.fromhex(
    "46454447020001000cd9028535040080020102040257300240800121520654026230018001210203030257"
    "310280010a210d060e026231010a210100018f326c90eeba8971a3c906e998832048627dade200b00561d1"
    "d3352cd3ecfeb23637420200ab592b41ccde4ce69d33c5d44063ee03a10065de0a81222104908c2172e04a"
    "1487e52b427b65e57b60e97bee5229c01d1b8540d2b2b23b3323322323c32ecccc22bb212312b1c2c2c2cb"
    "cc2323cbb2dcbd23223ccd2c2b3c3122cb2c13008142ee2840edb657a2dc691b85709d1fd9c98c0185cc5c"
    "4011001e1dd01e0104316cfb3f00"
)
DENSE_BLOB = bytes.fromhex(
    "4645444702000100ffffffffffffffff7f00012001030100030173000001760103000165020003000000803e"
    "614b4dbf9884a9bf82527ebe"
)
MODEL = {"a": np.array([[1.5, -2.0], [0.0, 3.25]], np.float32), "b": np.array([0.5], np.float32)}
MODEL_F16_BLOB = bytes.fromhex("4645444702000200020161020202100162010110003e00c0000080420038")

# Blobs of the fixed-width layout numbered 1 that preceded this one during development (the
# same small update and model): refused like any other version.
OLD_UPDATE = bytes.fromhex(
    "4645444701000100ffffffffffffff7f00000000000000000100000000000000200100000300000000000000"
    "0000f03f03000000010073000000000100000000000000000000000400000000000000010076010300000000"
    "00000300000000000000000000000c0000000000000001006502000000000300000000000000000000000000"
    "000000000000000000000000000000803e614b4dbf9884a9bf82527ebe"
)
OLD_MODEL = bytes.fromhex(
    "4645444701000200020000000100610202000000020000000001000400000000000000000000000800000000"
    "00000001006201010000000001000100000000000000000000000200000000000000003e00c0000080420038"
)

MLP_SPEC = architectures.build_spec(
    {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]}
)
MLP_POLICY = CompressionPolicy(topk_fraction=0.01, bits=4, chunk=256)


class Ids(TypedDict):
    task_id: int
    base_version: int
    num_examples: int


MLP_IDS: Ids = {"task_id": 12, "base_version": 345, "num_examples": 6789}
SMALL_POLICY = CompressionPolicy(
    topk_fraction=1.0, bits=32, chunk=3, scope="global", error_feedback=False
)
SMALL_IDS: Ids = {"task_id": (1 << 63) - 1, "base_version": 0, "num_examples": 1}


def _mlp_update() -> CompressedUpdate:
    """Top-1 % 4-bit update of the 64-128-10 MLP (9,610 parameters), seeded."""
    gen = np.random.default_rng(2026)
    delta = {t.name: gen.standard_normal(t.shape, dtype=np.float32) for t in MLP_SPEC.tensors}
    return compress(delta, MLP_POLICY, np.random.default_rng(7))


def _small_dense_update() -> CompressedUpdate:
    gen = np.random.default_rng(5)
    w = {
        "s": np.array(0.25, np.float32),
        "v": gen.standard_normal(3).astype(np.float32),
        "e": np.zeros((0, 3), np.float32),
    }
    return compress(w, SMALL_POLICY, np.random.default_rng(1))


@pytest.mark.parametrize(
    ("vector", "make", "policy", "ids"),
    [
        (MLP_BLOB, _mlp_update, MLP_POLICY, MLP_IDS),
        (DENSE_BLOB, _small_dense_update, SMALL_POLICY, SMALL_IDS),
    ],
    ids=["mlp_top1_4bit", "small_dense_global"],
)
def test_pinned_update_vectors(
    vector: bytes, make: object, policy: CompressionPolicy, ids: Ids
) -> None:
    assert callable(make)
    c = make()
    assert encode_update(c, **ids) == vector
    assert vector[4:6] == FORMAT_VERSION.to_bytes(2, "little")
    d = decode_update(vector, policy=policy)
    expected = decompress(c)
    for name, dense in d.to_dense().items():
        np.testing.assert_array_equal(dense.view(np.uint32), expected[name].view(np.uint32))
    want = (ids["task_id"], ids["base_version"], ids["num_examples"])
    assert peek_update_header(vector) == want


def test_pinned_model_vector() -> None:
    assert encode_model(MODEL, dtype="f16") == MODEL_F16_BLOB
    out = decode_model(MODEL_F16_BLOB)
    assert {k: v.tolist() for k, v in out.items()} == {k: v.tolist() for k, v in MODEL.items()}
    # prefix 8, count 1, "a": 1 + 1 + 1 + 2 + 1 = 6, "b": 1 + 1 + 1 + 1 + 1 = 5, 10 value bytes
    assert len(MODEL_F16_BLOB) == 8 + 1 + 6 + 5 + 10


@pytest.mark.parametrize("version", [0, 1, 3, 0xFFFF])
def test_other_versions_are_unsupported(version: int) -> None:
    for blob, decode in [
        (DENSE_BLOB, decode_update),
        (DENSE_BLOB, peek_update_header),
        (MODEL_F16_BLOB, decode_model),
    ]:
        other = blob[:4] + version.to_bytes(2, "little") + blob[6:]
        with pytest.raises(WireFormatError) as err:
            decode(other)
        assert err.value.code == "unsupported_version"
    for old, decode in [
        (OLD_UPDATE, decode_update),
        (OLD_UPDATE, peek_update_header),
        (OLD_MODEL, decode_model),
    ]:
        with pytest.raises(WireFormatError) as err:
            decode(old)
        assert err.value.code == "unsupported_version"


# ------------------------------------------------------------------ fixed overhead

#: Documented in docs/wire-format.md ("Update header").
MLP_OVERHEAD, MLP_BYTES = 61, 229


def test_fixed_overhead_of_the_mlp_update() -> None:
    c = _mlp_update()
    blob = encode_update(c, **MLP_IDS)
    assert update_overhead_bytes(blob) == MLP_OVERHEAD
    assert len(blob) == MLP_BYTES
    # prefix 8 + header 12 (ids 1 + 2 + 2, bits, scope, chunk 2, fraction 2, count 1) + four
    # Rice descriptors (name length, name, ndim, dims, codings, nnz, p, index bytes):
    # W0 1+2+1+3+1+1+1+1 = 11, b0 10, W1 11, b1 9 = 61 bytes
    codings = [d.index_coding for d in descriptors_of(blob)]
    assert codings == [RICE] * 4
    assert len(blob) - MLP_OVERHEAD == 168
    # Smallest ids: one byte each.
    small = encode_update(c, task_id=1, base_version=0, num_examples=1)
    assert update_overhead_bytes(small) == MLP_OVERHEAD - 2
    # Dense f32 upload of the same model: 9,610 x 4 value bytes + the header.
    dense = compress(
        {t.name: np.ones(t.shape, np.float32) for t in MLP_SPEC.tensors},
        DENSE,
        np.random.default_rng(0),
    )
    assert update_overhead_bytes(encode_update(dense, **MLP_IDS)) == 49


# ------------------------------------------------------------------ varints


@given(st.integers(0, (1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    data = encode_varint(value)
    assert len(data) == max(1, -(-value.bit_length() // 7))
    reader = Reader(as_bytes_view(data + b"\xff"))
    assert reader.varint("x") == value
    assert reader.pos == len(data)


def test_varint_encoder_rejects_out_of_range() -> None:
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match="varint"):
            encode_varint(bad)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "truncated"),
        (b"\x80", "truncated"),
        (b"\xff" * 9, "truncated"),
        (b"\x80\x00", "bad_varint"),  # 0 in two bytes
        (b"\x81\x80\x00", "bad_varint"),  # 1 in three bytes
        (b"\xff" * 9 + b"\x02", "bad_varint"),  # 2**64: overflows u64
        (b"\xff" * 9 + b"\x7f", "bad_varint"),
        (b"\x80" * 10 + b"\x01", "bad_varint"),  # 11 bytes
        (b"\xff" * 10, "bad_varint"),  # continuation bit on the 10th byte
    ],
)
def test_malformed_varints(data: bytes, code: str) -> None:
    with pytest.raises(WireFormatError) as err:
        Reader(as_bytes_view(data)).varint("x")
    assert err.value.code == code


def test_largest_varint() -> None:
    data = b"\xff" * 9 + b"\x01"
    assert encode_varint((1 << 64) - 1) == data
    assert Reader(as_bytes_view(data)).varint("x") == (1 << 64) - 1


NON_MINIMAL_ONE = b"\x81\x00"

# Every varint field of an update header, written non-minimally.
VARINT_FIELDS = ["task", "base", "examples", "chunk", "mantissa", "exponent", "count"]


@pytest.mark.parametrize("field", VARINT_FIELDS)
def test_non_minimal_header_varints_are_rejected(field: str) -> None:
    valid = update_blob(examples=1, chunk=1, task=1, base=1, mantissa=1, exponent=0)
    assert decode_update(valid).num_examples == 1
    good = {"exponent": 0} if field == "exponent" else {}
    fields: dict[str, object] = {"task": 1, "base": 1, "examples": 1, "chunk": 1, "mantissa": 1}
    fields.update(good)
    fields[field] = b"\x80\x00" if field == "exponent" else NON_MINIMAL_ONE
    with pytest.raises(WireFormatError) as err:
        decode_update(update_blob(**fields))  # type: ignore[arg-type]
    assert err.value.code == "bad_varint"
    with pytest.raises(WireFormatError) as err:
        peek_update_header(update_blob(**fields))  # type: ignore[arg-type]
    assert err.value.code == "bad_varint"


def _descriptor(*parts: bytes) -> bytes:
    return b"".join(parts)


DENSE_W = RawTensor()  # "w", shape (4,), dense f32


@pytest.mark.parametrize(
    ("descriptor", "code"),
    [
        (_descriptor(b"\x81\x00", b"w", b"\x01", b"\x04", b"\x00"), "bad_varint"),  # name len
        (_descriptor(b"\x01", b"w", b"\x01", b"\x84\x00", b"\x00"), "bad_varint"),  # dim
        (_descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x00"), None),  # the valid one
        (_descriptor(b"\x00", b"\x01", b"w", b"\x04", b"\x00"), "bad_descriptor"),  # empty name
        (_descriptor(b"\x01", b"w", b"\x09", b"\x04" * 9, b"\x00"), "limit_exceeded"),  # ndim
        (_descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x04"), "unknown_encoding"),  # index 4
        (_descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x30"), "unknown_encoding"),  # value 3
        (_descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x10"), "bad_descriptor"),  # f16 update
        (_descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x03", b"\x05"), "bad_descriptor"),
        (_descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x03", b"\x81\x00"), "bad_varint"),
        (
            _descriptor(b"\x01", b"w", b"\x01", b"\x04", b"\x01", b"\x04", b"\x20"),
            "bad_index_coding",
        ),
        (
            _descriptor(b"\x01", b"w", b"\x02", encode_varint(1 << 32), b"\x00", b"\x00"),
            "limit_exceeded",
        ),
    ],
)
def test_descriptor_errors(descriptor: bytes, code: str | None) -> None:
    blob = update_blob([DENSE_W], descriptors=[descriptor])
    if code is None:
        assert decode_update(blob).to_dense()["w"].tolist() == [0, 1, 2, 3]
        return
    with pytest.raises(WireFormatError) as err:
        decode_update(blob)
    assert err.value.code == code


def test_sparse_descriptors() -> None:
    """Bitmap and raw lengths are implied; Rice carries its parameter and length."""
    values = np.array([7.0, 8.0], "<f4").tobytes()
    raw = RawTensor(
        shape=(100,),
        index_coding=RAW,
        nnz=2,
        index=np.array([3, 90], "<u2").tobytes(),
        values=values,
    )
    bitmap_index = np.packbits(np.isin(np.arange(16), [3, 9]), bitorder="little").tobytes()
    bitmap = RawTensor(
        name="b", shape=(16,), index_coding=BITMAP, nnz=2, index=bitmap_index, values=values
    )
    assert raw.descriptor_bytes() == b"\x01w\x01\x64\x03\x02"
    assert bitmap.descriptor_bytes() == b"\x01b\x01\x10\x02\x02"
    d = decode_update(update_blob([raw, bitmap]))
    assert [t.indices.tolist() for t in d.tensors if t.indices is not None] == [[3, 90], [3, 9]]
    rice_lo, rice_hi = index_section_bounds(RICE, 2, 2, 100)
    for ibytes in (rice_lo - 1, rice_hi + 1):
        rice = RawTensor(
            shape=(100,),
            index_coding=RICE,
            param=2,
            nnz=2,
            index_bytes=ibytes,
            index=b"\0" * max(ibytes, 0),
            values=values,
        )
        with pytest.raises(WireFormatError) as err:
            decode_update(update_blob([rice]))
        assert err.value.code == "bad_descriptor"


def test_quantized_value_length_is_implied() -> None:
    c = _mlp_update()
    blob = encode_update(c, **MLP_IDS)
    descs = descriptors_of(blob)
    assert all(d.value_coding == VALUE_QUANT for d in descs)
    # Removing one value byte (or adding one) is caught as truncated / trailing bytes.
    with pytest.raises(WireFormatError) as err:
        decode_update(blob[:-1])
    assert err.value.code == "truncated"
    with pytest.raises(WireFormatError) as err:
        decode_update(blob + b"\0")
    assert err.value.code == "trailing_bytes"


# ------------------------------------------------------------------ top-k fraction


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
        st.sampled_from(
            [1.0, 0.5, 0.1, 0.01, 0.001, 1e-6, 0.07, 1 / 3, 5e-324, 2.2250738585072014e-308]
        ),
    )
)
def test_fraction_round_trips_exactly(fraction: float) -> None:
    m, e = fraction_parts(fraction)
    assert m % 10 != 0 and e <= MAX_FRACTION_EXPONENT
    data = encode_fraction(fraction)
    reader = Reader(as_bytes_view(data))
    got = reader.fraction("f")
    assert got == fraction and reader.pos == len(data)
    w = {"w": np.linspace(-1, 1, 20, dtype=np.float32)}
    policy = CompressionPolicy(topk_fraction=fraction, bits=8, chunk=4)
    blob = encode_update(compress(w, policy, np.random.default_rng(0)), **MLP_IDS)
    assert decode_update(blob, policy=policy).topk_fraction == fraction


def test_common_fractions_take_two_bytes() -> None:
    for f, parts in [(0.01, (1, 2)), (1.0, (1, 0)), (0.25, (25, 2)), (1e-5, (1, 5))]:
        assert fraction_parts(f) == parts
        assert len(encode_fraction(f)) == 2


@pytest.mark.parametrize(
    ("mantissa", "exponent"),
    [
        (10, 3),  # 0.01, not normalized
        (100, 4),
        (0, 0),  # zero
        (0, 5),
        (2, 0),  # 2 > 1
        (11, 1),  # 1.1
        (1, MAX_FRACTION_EXPONENT + 1),
        (10**17, 17),  # 18 digits
        (1, 400),  # underflows to 0
        (10000000000000001, 17),  # 17 digits that are not the shortest form of its double
    ],
)
def test_non_canonical_or_out_of_range_fractions(mantissa: int, exponent: int) -> None:
    blob = update_blob(mantissa=mantissa, exponent=exponent)
    with pytest.raises(WireFormatError) as err:
        decode_update(blob)
    assert err.value.code == "bad_header"


# ------------------------------------------------------------------ header fields


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"task": 1 << 63}, "bad_header"),
        ({"base": (1 << 64) - 1}, "bad_header"),
        ({"examples": 0}, "bad_header"),
        ({"examples": 1 << 63}, "bad_header"),
        ({"bits": 3}, "bad_header"),
        ({"scope": 2}, "bad_header"),
        ({"chunk": 0}, "bad_header"),
        ({"chunk": (1 << 20) + 1}, "limit_exceeded"),
        ({"count": 0}, "bad_header"),
        ({"count": 4097}, "limit_exceeded"),
        ({"count": 50}, "truncated"),
        ({"head": {"version": 1}}, "unsupported_version"),
        ({"head": {"version": 3}}, "unsupported_version"),
        ({"head": {"flags": 2}}, "bad_header"),
        ({"head": {"flags": 1}}, "bad_metrics"),  # announced, but a descriptor follows
    ],
)
def test_header_errors(fields: dict[str, object], code: str) -> None:
    with pytest.raises(WireFormatError) as err:
        decode_update(update_blob(**fields))  # type: ignore[arg-type]
    assert err.value.code == code


def test_largest_ids_round_trip() -> None:
    top = (1 << 63) - 1
    blob = update_blob(task=top, base=top, examples=top)
    assert peek_update_header(blob) == (top, top, top)
    assert decode_update(blob).task_id == top


def test_peek_reads_only_the_header() -> None:
    blob = encode_update(_mlp_update(), **MLP_IDS)
    header_end = 8 + 12
    assert peek_update_header(blob[:header_end]) == (12, 345, 6789)
    for n in range(header_end):
        with pytest.raises(WireFormatError) as err:
            peek_update_header(blob[:n])
        assert err.value.code == "truncated", n


def test_every_truncation_of_the_mlp_update() -> None:
    blob = encode_update(_mlp_update(), **MLP_IDS)
    for n in range(len(blob)):
        with pytest.raises(WireFormatError) as err:
            decode_update(blob[:n])
        assert err.value.code == "truncated", n


def test_count_is_checked_before_descriptors_are_parsed() -> None:
    """2**40 tensors declared in a 30-byte blob: truncated, nothing allocated."""
    blob = update_blob(count=1 << 40)
    generous = Limits(max_tensors=1 << 62)
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError) as err:
            decode_update(blob, limits=generous)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.code == "truncated"
    assert peak < 1 << 16


def test_encoder_rejects_dimensions_beyond_u32() -> None:
    from fedge.shared.compression import CompressedTensor

    t = CompressedTensor("w", (0, 1 << 32), None, values=np.zeros(0, np.float32))
    c = CompressedUpdate(bits=32, chunk=1, topk_fraction=1.0, scope="tensor", tensors=(t,))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        encode_update(c, task_id=1, base_version=0, num_examples=1)


def test_var_helper() -> None:
    assert var(300) == b"\xac\x02" and var(b"\x80\x00") == b"\x80\x00"
