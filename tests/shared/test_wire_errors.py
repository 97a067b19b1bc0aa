"""One crafted input per decoder error code (and per distinct cause where a code has several)."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable

import numpy as np
import pytest

from fedge.shared.compression import compress
from fedge.shared.feedback import Residual
from fedge.shared.indexcoding import BITMAP, RAW, RICE, encode_indices
from fedge.shared.limits import Limits
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.quantize import pack_codes
from fedge.shared.wire import (
    CODES,
    WireFormatError,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    peek_update_header,
)
from fedge.shared.wirelayout import FORMAT_VERSION, KIND_MODEL, VALUE_F16, VALUE_F32, VALUE_QUANT
from tests.shared.wirecraft import RawTensor, model_blob, prefix, update_blob


def _quant(codes: list[int], scales: list[float], bits: int) -> bytes:
    return np.array(scales, "<f4").tobytes() + pack_codes(np.array(codes, np.uint8), bits).tobytes()


def _sparse(coding: int, index: bytes, nnz: int, size: int = 100, param: int = 0) -> RawTensor:
    return RawTensor(
        shape=(size,),
        index_coding=coding,
        param=param,
        nnz=nnz,
        index=index,
        values=np.ones(nnz, "<f4").tobytes(),
    )


def _rice(indices: list[int], size: int) -> tuple[int, bytes]:
    enc = encode_indices(np.array(indices, np.int64), size)
    assert enc.coding == RICE
    return enc.param, enc.data.tobytes()


P5, RICE5 = _rice([5, 9, 40, 41, 60], 100)
# Rice with p = 0 for indices 0, 1, 101: ones at bits 0, 1 and 101 (13 bytes, fits size 100).
UNARY_0_1_101 = np.packbits(np.isin(np.arange(104), [0, 1, 101]), bitorder="little").tobytes()
VALID_UPDATE = update_blob()
VALID_MODEL = model_blob()

SPEC = ModelSpec.from_dict([{"name": "w", "shape": [4]}])

# (id, blob, code, decoder)
UpdateCase = tuple[str, bytes, str]
UPDATE_CASES: list[UpdateCase] = [
    ("bad_magic", b"FEDX" + VALID_UPDATE[4:], "bad_magic"),
    ("bad_magic_short", b"XY", "bad_magic"),
    ("unsupported_version", update_blob(head={"version": 3}), "unsupported_version"),
    ("unsupported_version_1", update_blob(head={"version": 1}), "unsupported_version"),
    ("unsupported_version_0", update_blob(head={"version": 0}), "unsupported_version"),
    ("wrong_kind", VALID_MODEL, "wrong_kind"),
    ("truncated_empty", b"", "truncated"),
    ("truncated_magic", b"FED", "truncated"),
    ("truncated_header", VALID_UPDATE[:12], "truncated"),
    ("truncated_section", VALID_UPDATE[:-1], "truncated"),
    ("trailing_bytes", VALID_UPDATE + b"\x00", "trailing_bytes"),
    ("too_many_tensors", update_blob(count=5000), "limit_exceeded"),
    ("name_too_long", update_blob([RawTensor(name="n" * 300)]), "limit_exceeded"),
    ("too_many_dims", update_blob([RawTensor(shape=(1,) * 9)]), "limit_exceeded"),
    (
        "tensor_too_big",
        update_blob([RawTensor(shape=(1 << 16, 1 << 16), nnz=0, values=b"")]),
        "limit_exceeded",
    ),
    ("chunk_too_big", update_blob(chunk=(1 << 20) + 1), "limit_exceeded"),
    ("unknown_kind", update_blob(head={"kind": 9}), "bad_header"),
    ("flags_set", update_blob(head={"flags": 2}), "bad_header"),
    ("zero_examples", update_blob(examples=0), "bad_header"),
    ("huge_task_id", update_blob(task=1 << 63), "bad_header"),
    ("bits_3", update_blob(bits=3), "bad_header"),
    ("unknown_scope", update_blob(scope=2), "bad_header"),
    ("chunk_zero", update_blob(chunk=0), "bad_header"),
    ("fraction_zero", update_blob(mantissa=0, exponent=0), "bad_header"),
    ("fraction_above_one", update_blob(mantissa=15, exponent=1), "bad_header"),
    ("fraction_not_shortest", update_blob(mantissa=10, exponent=1), "bad_header"),
    ("no_tensors", update_blob([]), "bad_header"),
    ("empty_name", update_blob([RawTensor(raw_name=b"")]), "bad_descriptor"),
    ("name_not_utf8", update_blob([RawTensor(raw_name=b"\xff\xfe")]), "bad_descriptor"),
    ("duplicate_name", update_blob([RawTensor(), RawTensor()]), "bad_descriptor"),
    (
        "nnz_above_size",
        update_blob([_sparse(RAW, np.arange(5, dtype="<u2").tobytes(), 5, size=4)]),
        "bad_descriptor",
    ),
    (
        "f16_in_update",
        update_blob([RawTensor(value_coding=VALUE_F16, values=b"\0" * 8)]),
        "bad_descriptor",
    ),
    (
        "quant_in_32bit_update",
        update_blob([RawTensor(value_coding=VALUE_QUANT, values=_quant([0] * 4, [1.0], 4))]),
        "bad_descriptor",
    ),
    ("f32_in_4bit_update", update_blob(bits=4), "bad_descriptor"),
    (
        "rice_index_bytes_too_few",
        update_blob(
            [RawTensor(**{**_sparse(RICE, RICE5, 5, param=P5).__dict__, "index_bytes": 1})]
        ),
        "bad_descriptor",
    ),
    ("unknown_index_coding", update_blob([_sparse(7, b"", 1)]), "unknown_encoding"),
    ("unknown_value_coding", update_blob([RawTensor(value_coding=9)]), "unknown_encoding"),
    (
        "nan_value",
        update_blob([RawTensor(values=np.array([0, np.nan, 1, 2], "<f4").tobytes())]),
        "non_finite",
    ),
    (
        "inf_value",
        update_blob([RawTensor(values=np.array([0, 1, -np.inf, 2], "<f4").tobytes())]),
        "non_finite",
    ),
    (
        "nan_scale",
        update_blob(
            [RawTensor(value_coding=VALUE_QUANT, values=_quant([0] * 4, [math.nan], 4))], bits=4
        ),
        "non_finite",
    ),
    (
        "inf_scale",
        update_blob(
            [RawTensor(value_coding=VALUE_QUANT, values=_quant([0] * 4, [math.inf], 4))], bits=4
        ),
        "non_finite",
    ),
    (
        "negative_scale",
        update_blob(
            [RawTensor(value_coding=VALUE_QUANT, values=_quant([0] * 4, [-1.0], 4))], bits=4
        ),
        "negative_scale",
    ),
    (
        "code_3_in_2bit",
        update_blob(
            [RawTensor(value_coding=VALUE_QUANT, values=_quant([0, 3, 1, 2], [1.0], 2))], bits=2
        ),
        "invalid_code",
    ),
    (
        "code_15_in_4bit",
        update_blob(
            [RawTensor(value_coding=VALUE_QUANT, values=_quant([15, 0, 1, 2], [1.0], 4))], bits=4
        ),
        "invalid_code",
    ),
    (
        "code_255_in_8bit",
        update_blob(
            [RawTensor(value_coding=VALUE_QUANT, values=_quant([1, 255, 1, 2], [1.0], 8))], bits=8
        ),
        "invalid_code",
    ),
    (
        "padding_bits_set",
        update_blob(
            [
                RawTensor(
                    shape=(3,),
                    value_coding=VALUE_QUANT,
                    values=np.array([1.0], "<f4").tobytes() + bytes([0b1100_0000]),
                )
            ],
            bits=2,
        ),
        "invalid_code",
    ),
    (
        "bitmap_padding_set",
        update_blob([_sparse(BITMAP, b"\x01" + b"\0" * 11 + b"\x80", 1)]),
        "bad_index_coding",
    ),
    (
        "rice_spare_byte",
        update_blob([_sparse(RICE, _rice([0, 1, 2], 100)[1] + b"\0", 3)]),
        "bad_index_coding",
    ),
    (
        "rice_param_too_big",
        update_blob([_sparse(RICE, b"\0" * 8, 1, param=40)]),
        "bad_index_coding",
    ),
    ("bitmap_count", update_blob([_sparse(BITMAP, b"\x03" + b"\0" * 12, 1)]), "count_mismatch"),
    ("rice_count", update_blob([_sparse(RICE, b"\x07", 2)]), "count_mismatch"),
    (
        "raw_out_of_range",
        update_blob([_sparse(RAW, np.array([3, 100], "<u2").tobytes(), 2)]),
        "index_out_of_range",
    ),
    ("rice_out_of_range", update_blob([_sparse(RICE, UNARY_0_1_101, 3)]), "index_out_of_range"),
    (
        "raw_not_sorted",
        update_blob([_sparse(RAW, np.array([3, 1], "<u2").tobytes(), 2)]),
        "indices_not_sorted",
    ),
    (
        "raw_duplicate",
        update_blob([_sparse(RAW, np.array([1, 1], "<u2").tobytes(), 2)]),
        "duplicate_index",
    ),
]


@pytest.mark.parametrize(
    ("blob", "code"), [c[1:] for c in UPDATE_CASES], ids=[c[0] for c in UPDATE_CASES]
)
def test_update_error_codes(blob: bytes, code: str) -> None:
    with pytest.raises(WireFormatError) as err:
        decode_update(blob)
    assert err.value.code == code
    assert err.value.detail and code in str(err.value)


#: What each case's error says (read and checked by hand: details are part of the API).
UPDATE_DETAILS = {
    "bad_magic": "expected b'FEDG', got b'FEDX'",
    "bad_magic_short": "expected b'FEDG', got b'XY'",
    "unsupported_version": "format version 3, this decoder reads version 2",
    "unsupported_version_1": "format version 1, this decoder reads version 2",
    "unsupported_version_0": "format version 0, this decoder reads version 2",
    "wrong_kind": "expected a update, got a model",
    "truncated_empty": "header needs 8 bytes, only 0 remain",
    "truncated_magic": "header needs 8 bytes, only 3 remain",
    "truncated_header": "scope needs 1 bytes, only 0 remain",
    "truncated_section": "sections need 16 bytes, only 15 remain",
    "trailing_bytes": "1 bytes after the last section",
    "too_many_tensors": "5000 tensors, the limit is 4096",
    "name_too_long": "tensor 0 name is 300 bytes, the limit is 256",
    "too_many_dims": "tensor 'w' has 9 dims, the limit is 8",
    "tensor_too_big": "tensor 'w' has 4294967296 elements, the limit is 268435456",
    "chunk_too_big": "chunk 1048577, the limit is 1048576",
    "unknown_kind": "unknown blob kind 9",
    "flags_set": "reserved flags must be 0, got 0x02",
    "zero_examples": "num_examples must be in [1, 2**63), got 0",
    "huge_task_id": "task id and base version must be below 2**63",
    "bits_3": "bits must be one of (1, 2, 4, 8, 32), got 3",
    "unknown_scope": "unknown top-k scope 2",
    "chunk_zero": "chunk must be at least 1",
    "fraction_zero": "topk_fraction 0e-0 is not in (0, 1]",
    "fraction_above_one": "topk_fraction 15e-1 is not in (0, 1]",
    "fraction_not_shortest": "topk_fraction 10e-1 is not the shortest decimal of 1.0",
    "no_tensors": "a blob must hold at least one tensor",
    "empty_name": "tensor 0 has an empty name",
    "name_not_utf8": "tensor 0 name is not UTF-8",
    "duplicate_name": "duplicate tensor name 'w'",
    "nnz_above_size": "tensor 'w': 5 values for 4 elements",
    "f16_in_update": "tensor 'w': value coding f16 is not allowed here",
    "quant_in_32bit_update": "tensor 'w': value coding quant is not allowed here",
    "f32_in_4bit_update": "tensor 'w': value coding f32 is not allowed here",
    "rice_index_bytes_too_few": "tensor 'w': index section is 1 bytes, not in [3, 4]",
    "unknown_index_coding": "tensor 'w': unknown index coding 7",
    "unknown_value_coding": "tensor 'w': unknown value coding 9",
    "nan_value": "tensor 'w': NaN or infinite value",
    "inf_value": "tensor 'w': NaN or infinite value",
    "nan_scale": "tensor 'w': NaN or infinite scale",
    "inf_scale": "tensor 'w': NaN or infinite scale",
    "negative_scale": "tensor 'w': negative scale",
    "code_3_in_2bit": "tensor 'w': code above 2",
    "code_15_in_4bit": "tensor 'w': code above 14",
    "code_255_in_8bit": "tensor 'w': code above 254",
    "padding_bits_set": "tensor 'w': padding bits after the last code are set",
    "bitmap_padding_set": "bitmap padding bits are not zero",
    "rice_spare_byte": "Rice unary stream has spare bytes at its end",
    "rice_param_too_big": "Rice parameter 40 > 31",
    "bitmap_count": "bitmap holds 2 indices, 1 declared",
    "rice_count": "Rice stream holds 3 indices, 2 declared",
    "raw_out_of_range": "index 100 >= size 100",
    "rice_out_of_range": "index 101 >= size 100",
    "raw_not_sorted": "index 1 is smaller than index 0",
    "raw_duplicate": "index 1 occurs twice",
}


def test_update_error_details() -> None:
    assert set(UPDATE_DETAILS) == {c[0] for c in UPDATE_CASES}
    for name, blob, code in UPDATE_CASES:
        with pytest.raises(WireFormatError) as err:
            decode_update(blob)
        assert (err.value.code, err.value.detail) == (code, UPDATE_DETAILS[name]), name
        assert str(err.value) == f"{code}: {UPDATE_DETAILS[name]}"


MODEL_CASES: list[UpdateCase] = [
    ("wrong_kind", VALID_UPDATE, "wrong_kind"),
    ("bad_magic", b"\0" * 20, "bad_magic"),
    ("truncated", VALID_MODEL[:-3], "truncated"),
    ("trailing", VALID_MODEL + b"x", "trailing_bytes"),
    ("version", prefix(kind=KIND_MODEL, version=7) + VALID_MODEL[8:], "unsupported_version"),
    ("version_1", prefix(kind=KIND_MODEL, version=1) + VALID_MODEL[8:], "unsupported_version"),
    ("flags_set", model_blob(head={"flags": 1}), "bad_header"),
    ("unknown_kind", model_blob(head={"kind": 9}), "bad_header"),
    ("delta_kind", model_blob(head={"kind": 3}), "wrong_kind"),
    ("zero_tensors", model_blob([]), "bad_header"),
    ("huge_count", model_blob(count=0xFFFFFFFF), "limit_exceeded"),
    ("sparse_model", model_blob([_sparse(BITMAP, b"\x01" + b"\0" * 12, 1)]), "bad_descriptor"),
    (
        "quant_model",
        model_blob([RawTensor(value_coding=VALUE_QUANT, values=_quant([0] * 4, [1.0], 4))]),
        "bad_descriptor",
    ),
    (
        "nan",
        model_blob([RawTensor(values=np.array([0, 1, 2, np.nan], "<f4").tobytes())]),
        "non_finite",
    ),
    (
        "f16_inf",
        model_blob(
            [RawTensor(value_coding=VALUE_F16, values=np.array([0, np.inf, 1, 2], "<f2").tobytes())]
        ),
        "non_finite",
    ),
]


@pytest.mark.parametrize(
    ("blob", "code"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES]
)
def test_model_error_codes(blob: bytes, code: str) -> None:
    with pytest.raises(WireFormatError) as err:
        decode_model(blob)
    assert err.value.code == code


def test_crafted_blobs_are_valid_apart_from_the_defect() -> None:
    """The crafting helpers themselves produce decodable blobs."""
    assert decode_update(VALID_UPDATE).to_dense()["w"].tolist() == [0, 1, 2, 3]
    assert decode_model(VALID_MODEL)["w"].tolist() == [0, 1, 2, 3]
    d = decode_update(update_blob([_sparse(RICE, RICE5, 5, param=P5)]))
    assert d.tensors[0].indices is not None
    assert d.tensors[0].indices.tolist() == [5, 9, 40, 41, 60]
    raw = decode_update(update_blob([_sparse(RAW, np.array([1, 3], "<u2").tobytes(), 2)]))
    assert raw.tensors[0].indices is not None and raw.tensors[0].indices.tolist() == [1, 3]
    q = update_blob(
        [RawTensor(value_coding=VALUE_QUANT, values=_quant([0, 1, 2, 1], [2.0], 2))], bits=2
    )
    assert decode_update(q).tensors[0].values.tolist() == [-2.0, 0.0, 2.0, 0.0]


def _update(w: dict[str, np.ndarray], policy: CompressionPolicy) -> bytes:
    c = compress(w, policy, np.random.default_rng(0))
    return encode_update(c, task_id=1, base_version=0, num_examples=1)


W = {"a": np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10), "b": np.ones(10, np.float32)}
POLICY = CompressionPolicy(topk_fraction=0.1, bits=4, chunk=16)


@pytest.mark.parametrize(
    "spec",
    [
        [{"name": "a", "shape": [100]}, {"name": "b", "shape": [10]}],
        [{"name": "a", "shape": [10, 10]}, {"name": "c", "shape": [10]}],
        [{"name": "b", "shape": [10]}, {"name": "a", "shape": [10, 10]}],
        [{"name": "a", "shape": [10, 10]}],
        [
            {"name": "a", "shape": [10, 10]},
            {"name": "b", "shape": [10]},
            {"name": "c", "shape": []},
        ],
    ],
)
def test_shape_mismatch(spec: list[dict[str, object]]) -> None:
    blob = _update(W, POLICY)
    decode_update(blob, spec=ModelSpec.from_weights(W))
    with pytest.raises(WireFormatError) as err:
        decode_update(blob, spec=ModelSpec.from_dict(spec))
    assert err.value.code == "shape_mismatch"
    with pytest.raises(WireFormatError) as err:
        decode_model(encode_model(W), spec=ModelSpec.from_dict(spec))
    assert err.value.code == "shape_mismatch"


@pytest.mark.parametrize(
    ("sent", "expected", "detail"),
    [
        (
            CompressionPolicy(topk_fraction=0.1, bits=8, chunk=16),
            POLICY,
            "8-bit values, the policy says 4",
        ),
        (
            CompressionPolicy(topk_fraction=0.1, bits=4, chunk=32),
            POLICY,
            "chunk 32, the policy says 16",
        ),
        (
            CompressionPolicy(topk_fraction=0.1, bits=4, chunk=16, scope="global"),
            POLICY,
            "scope 'global', the policy says 'tensor'",
        ),
        # ceil(0.1 * 100) = 10 values of tensor a; 20 and 100 sent.
        (
            CompressionPolicy(topk_fraction=0.2, bits=4, chunk=16),
            POLICY,
            "tensor 'a' carries 20 values, at most 10",
        ),
        (
            CompressionPolicy(topk_fraction=1.0, bits=4, chunk=16),
            POLICY,
            "tensor 'a' carries 100 values, at most 10",
        ),
        # Global scope: ceil(0.1 * 110) = 11 values in all; 22 sent.
        (
            CompressionPolicy(topk_fraction=0.2, bits=4, chunk=16, scope="global"),
            CompressionPolicy(topk_fraction=0.1, bits=4, chunk=16, scope="global"),
            "the update carries 22 values, at most 11",
        ),
    ],
)
def test_policy_mismatch(sent: CompressionPolicy, expected: CompressionPolicy, detail: str) -> None:
    blob = _update(W, sent)
    decode_update(blob, policy=sent)
    with pytest.raises(WireFormatError) as err:
        decode_update(blob, policy=expected)
    assert (err.value.code, err.value.detail) == ("policy_mismatch", detail)


def test_policy_allows_fewer_values_and_global_scope_budget() -> None:
    sent = CompressionPolicy(topk_fraction=0.05, bits=4, chunk=16)
    decode_update(_update(W, sent), policy=CompressionPolicy(topk_fraction=0.1, bits=4, chunk=16))
    # Global scope may concentrate the whole budget in one tensor.
    g = CompressionPolicy(topk_fraction=0.1, bits=4, chunk=16, scope="global")
    w = {"a": W["a"] * 100, "b": W["b"]}
    d = decode_update(_update(w, g), policy=g)
    assert d.tensors[1].values.size == 0 and d.nnz == 11


def test_checksum_mismatch_on_corrupt_residual() -> None:
    data = bytearray(Residual({"w": np.ones(4, np.float32)}).to_bytes())
    data[-1] ^= 0x01
    with pytest.raises(WireFormatError) as err:
        Residual.from_bytes(bytes(data))
    assert err.value.code == "checksum_mismatch"


def test_every_code_is_tested() -> None:
    tested = {c[2] for c in UPDATE_CASES} | {c[2] for c in MODEL_CASES}
    tested |= {"shape_mismatch", "policy_mismatch", "checksum_mismatch"}
    tested |= {"bad_varint"}  # tests/shared/test_wire_layout.py
    tested |= {"bad_metrics"}  # tests/shared/test_wire_metrics.py
    tested |= {"chain_mismatch"}  # tests/shared/test_broadcast.py
    assert tested == set(CODES)


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown wire error code"):
        WireFormatError("nope", "x")


def test_peek_update_header() -> None:
    blob = update_blob(task=7, base=3, examples=11)
    assert peek_update_header(blob) == (7, 3, 11)
    header_end = 8 + 10  # prefix; 7, 3, 11, bits, scope, chunk 256 (2 bytes), 1, 0, count
    assert peek_update_header(blob[:header_end]) == (7, 3, 11)
    for bad, code in [
        (blob[: header_end - 1], "truncated"),
        (VALID_MODEL, "wrong_kind"),
        (update_blob(examples=0), "bad_header"),
    ]:
        with pytest.raises(WireFormatError) as err:
            peek_update_header(bad)
        assert err.value.code == code


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_model({"w": np.array([1.0, np.nan], np.float32)}), "NaN"),
        (lambda: encode_model({"w": np.array([1, 2], np.int32)}), "floating dtype"),
        (
            lambda: encode_model({"w": np.array([7e4], np.float32)}, dtype="f16"),
            "overflows float16",
        ),
        (lambda: encode_model({"w": np.ones(2, np.float32)}, dtype="f64"), "dtype"),  # type: ignore[arg-type]
        (lambda: encode_model({}), "non-empty"),
        (lambda: encode_model({"w": [1.0, 2.0]}), "numpy array"),  # type: ignore[dict-item]
        (lambda: encode_model({"": np.ones(1, np.float32)}), "non-empty string"),
        (
            lambda: encode_update(
                compress(W, POLICY, np.random.default_rng(0)),
                task_id=-1,
                base_version=0,
                num_examples=1,
            ),
            "task_id",
        ),
        (
            lambda: encode_update(
                compress(W, POLICY, np.random.default_rng(0)),
                task_id=0,
                base_version=1 << 63,
                num_examples=1,
            ),
            "base_version",
        ),
        (
            lambda: encode_update(
                compress(W, POLICY, np.random.default_rng(0)),
                task_id=0,
                base_version=0,
                num_examples=0,
            ),
            "num_examples",
        ),
    ],
)
def test_encoders_validate_input(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_f16_accepts_values_that_round_to_its_max() -> None:
    out = decode_model(encode_model({"w": np.array([65504.0, -65519.0], np.float32)}, dtype="f16"))
    assert out["w"].tolist() == [65504.0, -65504.0]


def test_limits_can_be_tightened() -> None:
    blob = _update(W, POLICY)
    for limits in (
        Limits(max_tensors=1),
        Limits(max_tensor_elements=50),
        Limits(max_total_elements=105),
        Limits(max_name_bytes=0 + 1, max_ndim=1),
        Limits(max_chunk=8),
    ):
        with pytest.raises(WireFormatError) as err:
            decode_update(blob, limits=limits)
        assert err.value.code == "limit_exceeded"
    with pytest.raises(ValueError, match="at most"):
        Limits(max_tensor_elements=1 << 32)


def test_layout_is_little_endian() -> None:
    blob = update_blob(task=0x0102030405060708, examples=3)
    assert blob[:4] == b"FEDG"
    assert struct.unpack_from("<H", blob, 4) == (FORMAT_VERSION,) == (2,)
    # LEB128: the least significant 7 bits first, the high bit set on all but the last byte
    task = 0x0102030405060708  # 57 bits: nine groups of 7
    groups = [(task >> (7 * i)) & 0x7F for i in range(9)]
    assert blob[8:17] == bytes([g | 0x80 for g in groups[:-1]] + groups[-1:])
    assert blob[8:17].hex() == "888e98a8c0e0808101"
    assert VALUE_F32 == 0


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ({"task_id": -1}, "task_id must be in [0, 2**63), got -1"),
        ({"base_version": 1 << 63}, f"base_version must be in [0, 2**63), got {1 << 63}"),
        ({"num_examples": 0}, "num_examples must be in [1, 2**63), got 0"),
        ({"task_id": True}, "task_id must be an integer, got True"),
        ({"base_version": 1.0}, "base_version must be an integer, got 1.0"),
        ({"num_examples": "5"}, "num_examples must be an integer, got '5'"),
    ],
)
def test_update_encoder_names_the_bad_id(ids: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"task_id": 1, "base_version": 0, "num_examples": 1, **ids}
    c = compress(W, POLICY, np.random.default_rng(0))
    with pytest.raises(ValueError) as err:
        encode_update(c, **fields)  # type: ignore[arg-type]
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("cut", "field"),
    [
        (8, "task_id"),
        (9, "base_version"),
        (10, "num_examples"),
        (11, "bits"),
        (12, "scope"),
        (13, "chunk"),
        (14, "chunk"),  # the second byte of chunk 256's varint
        (15, "topk_fraction mantissa"),
        (16, "topk_fraction exponent"),
        (17, "num_tensors"),
    ],
)
def test_a_header_cut_short_names_the_missing_field(cut: int, field: str) -> None:
    """The header after the 8-byte prefix: task 7, base 3, examples 11 (one byte each), bits,
    scope, chunk 256 (two bytes), the fraction's mantissa and exponent, the tensor count."""
    blob = update_blob(task=7, base=3, examples=11)
    with pytest.raises(WireFormatError) as err:
        decode_update(blob[:cut])
    assert (err.value.code, err.value.detail) == (
        "truncated",
        f"{field} needs 1 bytes, only 0 remain",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topk_fraction": 1.5}, "topk_fraction must be in (0, 1], got 1.5"),
        ({"topk_fraction": "0.5"}, "topk_fraction must be a number, got '0.5'"),
        ({"bits": 3}, "bits must be one of (1, 2, 4, 8, 32), got 3"),
        ({"chunk": 0}, "chunk must be between 1 and 1048576, got 0"),
        ({"scope": "bogus"}, "scope must be 'tensor' or 'global', got 'bogus'"),
        ({"tensors": ()}, "an update must hold at least one tensor"),
    ],
)
def test_update_encoder_checks_the_codec_and_the_tensors(
    change: dict[str, object], message: str
) -> None:
    c = dataclasses.replace(compress(W, POLICY, np.random.default_rng(0)), **change)
    with pytest.raises(ValueError) as err:
        encode_update(c, task_id=1, base_version=0, num_examples=1)
    assert str(err.value) == message


def test_update_encoder_applies_its_limits() -> None:
    c = compress(W, POLICY, np.random.default_rng(0))
    with pytest.raises(ValueError) as err:
        encode_update(c, task_id=1, base_version=0, num_examples=1, limits=Limits(max_tensors=1))
    assert str(err.value) == "update tensors: model spec has 2 tensors, more than the limit of 1"


def test_a_chunk_at_the_limit_is_accepted() -> None:
    blob = _update(W, POLICY)  # chunk 16
    assert decode_update(blob, limits=Limits(max_chunk=16)).chunk == 16
    with pytest.raises(WireFormatError) as err:
        decode_update(blob, limits=Limits(max_chunk=15))
    assert (err.value.code, err.value.detail) == ("limit_exceeded", "chunk 16, the limit is 15")
