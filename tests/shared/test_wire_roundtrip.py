"""Round trips through the wire format for every encoding, bit width and tensor shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.shared.compression import CompressedTensor, CompressedUpdate, compress, decompress
from fedge.shared.feedback import Residual
from fedge.shared.indexcoding import ALL, BITMAP, RAW, RICE
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import ALLOWED_BITS, CompressionPolicy
from fedge.shared.quantize import quantize
from fedge.shared.wire import (
    DecodedUpdate,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    peek_update_header,
)
from fedge.shared.wirelayout import FORMAT_VERSION, VALUE_F32, VALUE_QUANT
from tests.shared.wirecraft import descriptors_of

FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
F16_RANGE = st.floats(min_value=-65504, max_value=65504, width=32)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


@st.composite
def weights(
    draw: st.DrawFn, elements: st.SearchStrategy[float] = FINITE_F32
) -> dict[str, np.ndarray]:
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=n, max_size=n, unique=True))
    return {name: draw(hnp.arrays(np.float32, draw(SHAPES), elements=elements)) for name in names}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@settings(max_examples=80, deadline=None)
@given(w=weights())
def test_dense_f32_model_round_trip(w: dict[str, np.ndarray]) -> None:
    blob = encode_model(w)
    out = decode_model(blob, spec=ModelSpec.from_weights(w))
    assert list(out) == list(w)
    for name in w:
        _bits_equal(out[name], w[name])
        assert out[name].flags.writeable


def test_models_and_updates_are_written_in_the_one_version() -> None:
    w = {"w": np.ones(3, np.float32)}
    version = FORMAT_VERSION.to_bytes(2, "little")
    assert encode_model(w)[4:8] == version + bytes([2, 0])  # kind model, no flags
    c = compress(w, CompressionPolicy(topk_fraction=1.0, bits=32), np.random.default_rng(0))
    update = encode_update(c, task_id=1, base_version=0, num_examples=1)
    assert update[4:8] == version + bytes([1, 0])  # kind update, no metrics


@settings(max_examples=80, deadline=None)
@given(w=weights(F16_RANGE))
def test_dense_f16_model_round_trip(w: dict[str, np.ndarray]) -> None:
    blob = encode_model(w, dtype="f16")
    out = decode_model(blob)
    for name in w:
        np.testing.assert_array_equal(out[name], w[name].astype(np.float16).astype(np.float32))
        assert out[name].dtype == np.float32
    # Re-encoding the decoded f16 values is exact.
    assert encode_model(out, dtype="f16") == blob


def _check_update_round_trip(
    c: CompressedUpdate, policy: CompressionPolicy | None, spec: ModelSpec
) -> DecodedUpdate:
    blob = encode_update(c, task_id=12, base_version=3, num_examples=40)
    return _check_blob(blob, c, policy, spec)


def _check_blob(
    blob: bytes, c: CompressedUpdate, policy: CompressionPolicy | None, spec: ModelSpec
) -> DecodedUpdate:
    assert peek_update_header(blob) == (12, 3, 40)
    d = decode_update(memoryview(blob), spec=spec, policy=policy)
    assert (d.task_id, d.base_version, d.num_examples) == (12, 3, 40)
    assert (d.bits, d.chunk, d.topk_fraction, d.scope) == (
        c.bits,
        c.chunk,
        c.topk_fraction,
        c.scope,
    )
    assert d.nnz == c.nnz
    dense, expected = d.to_dense(), decompress(c)
    for t, dt in zip(c.tensors, d.tensors, strict=True):
        assert (dt.name, dt.shape) == (t.name, t.shape)
        if t.indices is None:
            assert dt.indices is None
        else:
            assert dt.indices is not None
            np.testing.assert_array_equal(dt.indices, t.indices)
        _bits_equal(dt.values, t.decoded_values())
        _bits_equal(dense[t.name], expected[t.name])
    return d


@settings(max_examples=150, deadline=None)
@given(
    w=weights(),
    bits=st.sampled_from(ALLOWED_BITS),
    fraction=st.sampled_from([1.0, 0.7, 0.3, 0.1, 0.01, 0.001]),
    scope=st.sampled_from(["tensor", "global"]),
    chunk=st.sampled_from([1, 3, 256]),
    seed=st.integers(0, 2**32 - 1),
    feedback=st.booleans(),
)
def test_compressed_update_round_trip(
    w: dict[str, np.ndarray],
    bits: int,
    fraction: float,
    scope: str,
    chunk: int,
    seed: int,
    feedback: bool,
) -> None:
    policy = CompressionPolicy(
        topk_fraction=fraction,
        bits=bits,
        chunk=chunk,
        scope=scope,  # type: ignore[arg-type]
        error_feedback=feedback,
    )
    spec = ModelSpec.from_weights(w)
    residual = Residual.zeros(spec) if feedback else None
    c = compress(w, policy, np.random.default_rng(seed), residual)
    _check_update_round_trip(c, policy, spec)


def _forced(
    indices: np.ndarray | None, size: int, bits: int, rng: np.random.Generator
) -> CompressedUpdate:
    n = size if indices is None else indices.size
    values = rng.standard_normal(n).astype(np.float32)
    if bits == 32:
        t = CompressedTensor("w", (size,), indices, values=values)
    else:
        t = CompressedTensor(
            "w", (size,), indices, quantized=quantize(values, bits=bits, chunk=5, rng=rng)
        )
    return CompressedUpdate(bits=bits, chunk=5, topk_fraction=1.0, scope="tensor", tensors=(t,))


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize(
    ("indices", "size", "coding"),
    [
        (None, 37, ALL),
        (np.arange(3, 20_000, 97), 20_000, RICE),
        (np.arange(1, 20_000, 2), 20_000, BITMAP),
        (np.array([100, 50_000]), 60_000, RAW),
        (np.array([], dtype=np.int64), 9, RICE),
    ],
)
def test_every_index_coding_with_every_bit_width(
    indices: np.ndarray | None, size: int, coding: int, bits: int
) -> None:
    rng = np.random.default_rng(bits)
    idx = None if indices is None else indices.astype(np.int64)
    c = _forced(idx, size, bits, rng)
    (desc,) = descriptors_of(encode_update(c, task_id=1, base_version=0, num_examples=1))
    assert desc.index_coding == coding
    assert desc.value_coding == (VALUE_F32 if bits == 32 else VALUE_QUANT)
    _check_update_round_trip(c, None, c.spec)


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 0, 2), (1, 1, 1)])
@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_scalar_empty_and_single_element_tensors(shape: tuple[int, ...], bits: int) -> None:
    w = {"big": np.linspace(-1, 1, 50, dtype=np.float32), "t": np.full(shape, 0.5, np.float32)}
    for fraction in (1.0, 0.1):
        policy = CompressionPolicy(topk_fraction=fraction, bits=bits, chunk=4)
        c = compress(w, policy, np.random.default_rng(0))
        d = _check_update_round_trip(c, policy, ModelSpec.from_weights(w))
        assert d.to_dense()["t"].shape == shape
        m = decode_model(encode_model(w))
        assert m["t"].shape == shape


def test_add_to_accumulates_weighted_sparse_and_dense_updates() -> None:
    rng = np.random.default_rng(8)
    w = {
        "a": rng.standard_normal((20, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
    }
    spec = ModelSpec.from_weights(w)
    sparse = decode_update(
        encode_update(
            compress(w, CompressionPolicy(topk_fraction=0.1, bits=4), rng),
            task_id=1,
            base_version=0,
            num_examples=5,
        )
    )
    dense = decode_update(
        encode_update(
            compress(w, CompressionPolicy(topk_fraction=1.0, bits=32), rng),
            task_id=1,
            base_version=0,
            num_examples=5,
        )
    )
    acc = {t.name: np.ones(t.shape, np.float64) for t in spec.tensors}
    sparse.add_to(acc, 0.25)
    dense.add_to(acc, 2.0)
    for name in acc:
        expected = 1.0 + 0.25 * sparse.to_dense()[name].astype(np.float64) + 2.0 * w[name]
        np.testing.assert_allclose(acc[name], expected, rtol=1e-12)
        assert acc[name].dtype == np.float64


def test_add_to_rejects_bad_accumulators_without_adding() -> None:
    w = {"a": np.ones(4, np.float32), "b": np.ones(3, np.float32)}
    d = decode_update(
        encode_update(
            compress(w, CompressionPolicy(topk_fraction=1.0, bits=32), np.random.default_rng(0)),
            task_id=1,
            base_version=0,
            num_examples=1,
        )
    )
    acc = {"a": np.zeros(4), "b": np.zeros(4)}
    with pytest.raises(ValueError) as err:
        d.add_to(acc, 1.0)
    assert str(err.value) == "accumulator for 'b' has shape (4,), need (3,)"
    np.testing.assert_array_equal(acc["a"], 0.0)
    with pytest.raises(ValueError, match="'b' has shape None"):
        d.add_to({"a": np.zeros(4)}, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        d.add_to({"a": np.zeros(8)[::2], "b": np.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="floating"):
        d.add_to({"a": np.zeros(4, np.int64), "b": np.zeros(3)}, 1.0)


def _dense_update(w: dict[str, np.ndarray]) -> DecodedUpdate:
    policy = CompressionPolicy(topk_fraction=1.0, bits=32)
    c = compress(w, policy, np.random.default_rng(0))
    return decode_update(encode_update(c, task_id=1, base_version=0, num_examples=1))


def test_add_to_forms_the_product_in_the_accumulators_dtype() -> None:
    """float64 accumulator: weight * value is exact to float64, not rounded to float32 first;
    a float32 accumulator (a floating dtype too) is accepted and gets the float32 product."""
    x = np.float32(1.0 + 2.0**-22)
    d = _dense_update({"a": np.array([x, 3.0], np.float32)})
    acc = {"a": np.zeros(2, np.float64)}
    d.add_to(acc, 1.0 / 3.0)
    assert acc["a"].tolist() == [float(x) * (1.0 / 3.0), 3.0 * (1.0 / 3.0)]
    assert float(np.float32(float(x) / 3.0)) != float(x) * (1.0 / 3.0)  # float32 would differ
    acc32 = {"a": np.zeros(2, np.float32)}
    d.add_to(acc32, 2.0)
    assert acc32["a"].dtype == np.float32 and acc32["a"].tolist() == [2 * float(x), 6.0]
