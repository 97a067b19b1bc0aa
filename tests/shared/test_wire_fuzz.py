"""Random and mutated inputs: decoders raise only WireFormatError and never over-allocate."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.shared.compression import compress
from fedge.shared.indexcoding import index_section_bounds
from fedge.shared.limits import Limits
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import (
    WireFormatError,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
)
from fedge.shared.wirelayout import FORMAT_VERSION, KIND_MODEL, encode_varint
from tests.shared.wirecraft import RawTensor, model_blob, prefix, update_blob

Decoder = Callable[[bytes], object]


def _valid_blobs() -> list[bytes]:
    rng = np.random.default_rng(11)
    w = {
        "conv": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
        "scalar": np.array(0.5, np.float32),
        "empty": np.zeros((0, 2), np.float32),
        "big": rng.standard_normal(300).astype(np.float32),
    }
    blobs = [encode_model(w), encode_model(w, dtype="f16")]
    for bits, fraction, scope in [
        (32, 1.0, "tensor"),
        (1, 0.01, "tensor"),
        (2, 0.3, "global"),
        (4, 0.6, "tensor"),
        (8, 0.05, "global"),
        (4, 1.0, "tensor"),
    ]:
        policy = CompressionPolicy(topk_fraction=fraction, bits=bits, chunk=5, scope=scope)  # type: ignore[arg-type]
        c = compress(w, policy, rng)
        blobs.append(encode_update(c, task_id=3, base_version=2, num_examples=9))
    return blobs


VALID = _valid_blobs()
#: The first blobs of VALID are models (f32, f16), the rest updates.
NUM_MODELS = 2
DECODERS: list[Decoder] = [decode_update, decode_model]


def _decode_all(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(WireFormatError):
            decode(data)


def test_valid_blobs_decode() -> None:
    ok = 0
    for blob in VALID:
        for decode in DECODERS:
            try:
                decode(blob)
                ok += 1
            except WireFormatError as exc:
                assert exc.code == "wrong_kind"
    assert ok == len(VALID)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    _decode_all(data)


@FUZZ
@given(tail=st.binary(max_size=300), kind=st.sampled_from([1, 2]), flags=st.sampled_from([0, 1]))
def test_random_bytes_behind_a_valid_prefix(tail: bytes, kind: int, flags: int) -> None:
    _decode_all(prefix(kind=kind, flags=flags) + tail)


@FUZZ
@given(blob=st.sampled_from(VALID), data=st.data())
def test_bit_flips(blob: bytes, data: st.DataObject) -> None:
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) * 8 - 1))
        mutated[pos // 8] ^= 1 << (pos % 8)
    _decode_all(bytes(mutated))


@FUZZ
@given(blob=st.sampled_from(VALID), data=st.data())
def test_insertions_and_deletions(blob: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(blob)))
    if data.draw(st.booleans()):
        mutated = blob[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + blob[pos:]
    else:
        mutated = blob[:pos] + blob[pos + data.draw(st.integers(1, 16)) :]
    _decode_all(mutated)


HUGE = [0xFF, 0xFFFF, 0xFFFFFFFF, 1 << 31, 1 << 32, (1 << 63) + 5, (1 << 64) - 1]


@FUZZ
@given(blob=st.sampled_from(VALID), data=st.data())
def test_field_overwrites_with_huge_values(blob: bytes, data: st.DataObject) -> None:
    width = data.draw(st.sampled_from([1, 2, 4, 8]))
    pos = data.draw(st.integers(0, len(blob) - width))
    value = data.draw(st.sampled_from(HUGE)) & ((1 << (8 * width)) - 1)
    mutated = bytearray(blob)
    mutated[pos : pos + width] = value.to_bytes(width, "little")
    _decode_all(bytes(mutated))


@pytest.mark.parametrize("index", range(len(VALID)))
def test_every_truncation_is_reported_as_truncated(index: int) -> None:
    blob = VALID[index]
    decode = decode_model if index < NUM_MODELS else decode_update
    for n in range(len(blob)):
        with pytest.raises(WireFormatError) as err:
            decode(blob[:n])
        assert err.value.code == "truncated", n


@pytest.mark.parametrize("index", range(len(VALID)))
def test_every_single_bit_flip_in_the_headers(index: int) -> None:
    blob = VALID[index]
    for pos in range(min(len(blob), 200) * 8):
        mutated = bytearray(blob)
        mutated[pos // 8] ^= 1 << (pos % 8)
        _decode_all(bytes(mutated))


# ------------------------------------------------------------------- allocation bounds

GENEROUS = Limits(
    max_tensors=1 << 30,
    max_ndim=255,
    max_name_bytes=65535,
    max_tensor_elements=1 << 31,
    max_total_elements=1 << 40,
)

MALICIOUS: list[tuple[str, bytes, Limits]] = [
    ("many_tensors", update_blob(count=(1 << 64) - 1), GENEROUS),
    ("many_tensors_default_limits", update_blob(count=1 << 32), Limits()),
    ("huge_dense_tensor", update_blob([RawTensor(shape=(1 << 16, 1 << 15), values=b"")]), GENEROUS),
    (
        "huge_sparse_bitmap",
        update_blob([RawTensor(shape=(1 << 31,), index_coding=2, nnz=1 << 30, values=b"")]),
        GENEROUS,
    ),
    (
        "huge_raw",
        update_blob([RawTensor(shape=(1 << 31,), index_coding=3, nnz=1 << 30, values=b"")]),
        GENEROUS,
    ),
    (
        "huge_rice",
        update_blob(
            [
                RawTensor(
                    shape=(1 << 31,),
                    index_coding=1,
                    param=20,
                    nnz=(1 << 31) - 1,
                    index_bytes=index_section_bounds(1, 20, (1 << 31) - 1, 1 << 31)[1],
                    values=b"",
                )
            ]
        ),
        GENEROUS,
    ),
    (
        "huge_quantized",
        update_blob([RawTensor(shape=(1 << 31,), value_coding=2, values=b"")], bits=1),
        GENEROUS,
    ),
    (
        "huge_model",
        model_blob([RawTensor(name=f"t{i}", shape=(1 << 31,), values=b"") for i in range(3)]),
        GENEROUS,
    ),
    ("huge_model_count", model_blob(count=(1 << 64) - 1), GENEROUS),
    ("huge_name", update_blob([RawTensor(name="x" * 60000)])[:200], GENEROUS),
]


@pytest.mark.parametrize(
    ("blob", "limits"), [m[1:] for m in MALICIOUS], ids=[m[0] for m in MALICIOUS]
)
def test_huge_declared_sizes_do_not_allocate(blob: bytes, limits: Limits) -> None:
    decode = decode_model if blob[6] == KIND_MODEL else decode_update
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(WireFormatError) as err:
            decode(blob, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.code in {"truncated", "limit_exceeded"}
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_decoding_a_valid_blob_is_traced_by_tracemalloc() -> None:
    """Sanity check for the test above: numpy allocations do show up in tracemalloc."""
    blob = encode_model({"w": np.zeros(1 << 20, np.float32)})
    tracemalloc.start()
    try:
        decode_model(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= 4 << 20


def test_varint_overflow_fields_round_to_limit_errors() -> None:
    """Overwriting a real blob's one-byte tensor count with a 5-byte 2**32 - 1 is a limit
    error."""
    blob = VALID[NUM_MODELS]
    assert struct.unpack_from("<H", blob, 4) == (FORMAT_VERSION,)
    # after the prefix: task 3, base 2, examples 9, bits 32, scope 0, chunk 5,
    # fraction 1 (m = 1, e = 0), 5 tensors
    assert blob[8:17] == bytes([3, 2, 9, 32, 0, 5, 1, 0, 5])
    mutated = blob[:16] + encode_varint(0xFFFFFFFF) + blob[17:]
    with pytest.raises(WireFormatError) as err:
        decode_update(mutated)
    assert err.value.code == "limit_exceeded"
