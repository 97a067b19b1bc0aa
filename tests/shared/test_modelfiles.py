"""Model files a user keeps (``fedge.shared.modelfiles``): safetensors written and read by
hand, bit for bit; npz with the model object; and the built-in ``load`` + ``predict``."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fedge.shared import architectures
from fedge.shared.modelfiles import (
    decode_safetensors,
    encode_safetensors,
    read_model_file,
    write_model_file,
)
from fedge.shared.wire import encode_model

MLP = {"architecture": "mlp", "input_dim": 6, "num_classes": 3, "hidden": [5], "seed": 2}


def _awkward_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 values a careless writer would change: -0.0, subnormals, extremes."""
    special = np.array(
        [-0.0, 0.0, 1e-45, -1e-45, 1.17e-38, np.finfo(np.float32).max, np.finfo(np.float32).min],
        dtype=np.float32,
    )
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "bn.running_var": special,
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def test_safetensors_round_trip_is_bit_exact_and_keeps_order() -> None:
    weights = _awkward_weights(np.random.default_rng(0))
    data = encode_safetensors(weights, metadata={"k": "v"})
    (size,) = struct.unpack_from("<Q", data)
    assert size % 8 == 0  # the header is padded so the buffers are aligned
    got, metadata = decode_safetensors(data)
    assert list(got) == list(weights) and metadata == {"k": "v"}
    for name, a in weights.items():
        assert got[name].dtype == np.float32 and got[name].shape == a.shape
        assert got[name].tobytes() == a.tobytes()


def test_a_hand_built_file_in_the_published_layout_is_read() -> None:
    """The layout of the format's documentation: length, JSON header, raw buffers."""
    b = np.array([1.5, -2.0], dtype="<f2")
    w = np.arange(6, dtype="<f8").reshape(2, 3)
    header = {
        "w": {"dtype": "F64", "shape": [2, 3], "data_offsets": [4, 52]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
    }
    raw = json.dumps(header).encode()
    got, metadata = decode_safetensors(
        struct.pack("<Q", len(raw)) + raw + b.tobytes() + w.tobytes()
    )
    assert list(got) == ["b", "w"] and metadata == {}
    np.testing.assert_array_equal(got["b"], [1.5, -2.0])
    np.testing.assert_array_equal(got["w"], w.astype(np.float32))


def _file(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00", "shorter"),
        (struct.pack("<Q", 1 << 40) + b"{}", "runs past"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 2) + b"{x", "not JSON"),
        (_file({}, b""), "no tensors"),
        (_file({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "dtype"),
        (
            _file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
            "match its shape",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
            "cover 8 bytes",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
            "does not start",
        ),
        (
            _file({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}}, bytes(4)),
            "limit",
        ),
        (_file({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "exactly"),
        (
            _file(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "__metadata__": {"x": 1},
                },
                bytes(4),
            ),
            "strings",
        ),
    ],
)
def test_malformed_safetensors_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_safetensors(data)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_files_record_the_model_and_load_into_a_classifier(tmp_path, fmt: str) -> None:
    weights = architectures.init_weights(MLP, np.random.default_rng(3))
    path = tmp_path / f"model.{fmt}"
    write_model_file(path, weights, fmt=fmt, model=MLP)
    stored = read_model_file(path)
    assert stored.model == MLP and list(stored.weights) == list(weights)
    for name, a in weights.items():
        assert stored.weights[name].tobytes() == a.tobytes()
    clf = architectures.load(path)
    X = np.random.default_rng(4).standard_normal((20, 6)).astype(np.float32)
    logits = architectures.forward(MLP, weights, X)
    np.testing.assert_array_equal(clf.predict(X), logits.argmax(axis=1))
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)


def test_load_needs_a_builtin_model_and_matching_tensors(tmp_path) -> None:
    weights = architectures.init_weights(MLP, np.random.default_rng(3))
    wire = tmp_path / "model.bin"
    wire.write_bytes(encode_model(weights))
    with pytest.raises(ValueError, match="pass model="):
        architectures.load(wire)
    assert architectures.load(wire, model=MLP).predict(np.zeros((1, 6))).shape == (1,)
    custom = tmp_path / "custom.npz"
    write_model_file(custom, weights, fmt="npz", model={"spec": []})
    with pytest.raises(ValueError, match="custom model"):
        architectures.load(custom)
    other = {**MLP, "hidden": [7]}
    with pytest.raises(ValueError, match="shape"):
        architectures.load(wire, model=other)


def test_npz_files_never_unpickle(tmp_path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable"):
        read_model_file(path)
