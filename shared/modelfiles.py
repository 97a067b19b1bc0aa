"""Model files a user keeps: ``.npz`` and ``.safetensors`` (and the wire format, read only).

A downloaded model version is a set of named float32 tensors. Outside fedge people load
models from a few common formats, so ``fedge admin models download --format`` writes them:

- ``npz``: numpy's zip of ``.npy`` arrays, one per tensor in spec order, plus the task's
  ``model`` object as JSON in the uint8 array ``__fedge_model__``; read with
  ``allow_pickle=False``.
- ``safetensors`` (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
  length N, N bytes of JSON (``{"name": {"dtype": "F32", "shape": [...], "data_offsets":
  [begin, end]}, ..., "__metadata__": {"fedge.model": "<json>"}}``, padded with spaces to a
  multiple of 8), then the raw little-endian tensor bytes, in spec order. Written and read
  here by hand (the format is that small), so a device needs no extra package; the files
  open with the ``safetensors`` package too.
- ``torch``: a ``state_dict`` file, written by :mod:`fedge.edge_agent.torch_adapter` (only
  with the ``torch`` extra).

:func:`read_model_file` reads any of the first two and the wire format. Every size the
safetensors header declares is checked against the file's length and the limits before
anything is allocated; no reader unpickles.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire_model import decode_model

__all__ = [
    "FORMATS",
    "ModelFile",
    "decode_safetensors",
    "encode_safetensors",
    "format_for_path",
    "read_model_file",
    "write_model_file",
]

FORMATS = ("wire", "npz", "safetensors", "torch")
MODEL_KEY = "__fedge_model__"
METADATA_MODEL = "fedge.model"
#: Largest safetensors JSON header read (the format's own readers use 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
}
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class ModelFile:
    """Tensors read from a file (float32, in file order) and the task's ``model`` object
    when the file records it."""

    weights: Weights
    model: dict[str, Any] | None


def format_for_path(path: str | Path) -> str:
    """The format a file name suggests: ``.npz``, ``.safetensors``, ``.pt``/``.pth`` (torch),
    anything else the wire format."""
    suffix = Path(path).suffix.lower()
    return {".npz": "npz", ".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}.get(
        suffix, "wire"
    )


def _float32(weights: Mapping[str, np.ndarray]) -> Weights:
    ModelSpec.from_weights(weights)  # names and sizes within limits
    out: Weights = {}
    for name, array in weights.items():
        a = np.asarray(array)
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"tensor {name!r} is {a.dtype}, not floating point")
        out[name] = np.asarray(a, dtype="<f4", order="C")  # keeps 0-d arrays 0-d
    return out


def encode_safetensors(
    weights: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """``weights`` as float32 safetensors bytes, tensors in mapping order."""
    arrays = _float32(weights)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, a in arrays.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return b"".join([_U64.pack(len(raw)), raw, *(a.tobytes() for a in arrays.values())])


def _entry(
    name: str, entry: object, limits: Limits
) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"safetensors: tensor {name!r} needs exactly dtype, shape, data_offsets")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise ValueError(
            f"safetensors: tensor {name!r} has dtype {entry['dtype']!r}; "
            f"fedge reads {', '.join(_DTYPES)}"
        )
    shape = ModelSpec.from_dict([{"name": name, "shape": entry["shape"]}], limits=limits)
    dims = shape.tensors[0].shape
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise ValueError(f"safetensors: tensor {name!r} has bad data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(dims) * dtype.itemsize:
        raise ValueError(f"safetensors: tensor {name!r}: data_offsets do not match its shape")
    return dtype, dims, offsets[0], offsets[1]


def decode_safetensors(
    data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[Weights, dict[str, str]]:
    """Tensors (as float32, in data order) and the metadata of safetensors bytes;
    ``ValueError`` naming the first problem (sizes checked before anything is copied)."""
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise ValueError("safetensors: shorter than its 8-byte header length")
    (size,) = _U64.unpack_from(view, 0)
    if size > min(MAX_HEADER_BYTES, len(view) - 8):
        raise ValueError(f"safetensors: header length {size} runs past the file")
    try:
        header = json.loads(bytes(view[8 : 8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"safetensors: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors: the header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors: __metadata__ must map strings to strings")
    if not header:
        raise ValueError("safetensors: no tensors")
    entries = sorted(
        ((name, *_entry(name, e, limits)) for name, e in header.items()), key=lambda t: t[3]
    )
    ModelSpec.from_dict([{"name": e[0], "shape": list(e[2])} for e in entries], limits=limits)
    body = len(view) - 8 - size
    expected = 0
    for name, _, _, begin, end in entries:
        if begin != expected:
            raise ValueError(f"safetensors: tensor {name!r} does not start where the last ends")
        expected = end
    if expected != body:
        raise ValueError(f"safetensors: tensors cover {expected} bytes, the file holds {body}")
    base = 8 + size
    weights: Weights = {}
    for name, dtype, dims, begin, end in entries:
        values = np.frombuffer(view[base + begin : base + end], dtype=dtype).reshape(dims)
        weights[name] = values.astype(np.float32)  # a copy, native order
    return weights, dict(metadata)


def _model_json(model: Mapping[str, Any] | None) -> str | None:
    return None if model is None else json.dumps(dict(model), sort_keys=True)


def _parse_model(text: str | None, source: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        model = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{source}: the recorded model object is not JSON") from None
    if not isinstance(model, dict):
        raise ValueError(f"{source}: the recorded model object is not a JSON object")
    return model


def write_model_file(
    path: str | Path,
    weights: Mapping[str, np.ndarray],
    *,
    fmt: str,
    model: Mapping[str, Any] | None = None,
) -> int:
    """Write ``weights`` (and the task's ``model`` object) as ``fmt`` (``npz`` or
    ``safetensors``; the wire format is written from the downloaded bytes as they are, torch
    by the torch adapter). Returns the bytes written."""
    path = Path(path)
    if fmt == "safetensors":
        text = _model_json(model)
        data = encode_safetensors(weights, metadata={METADATA_MODEL: text} if text else None)
        path.write_bytes(data)
        return len(data)
    if fmt == "npz":
        arrays: dict[str, np.ndarray] = dict(_float32(weights))
        if MODEL_KEY in arrays:
            raise ValueError(f"a tensor may not be named {MODEL_KEY!r} in an .npz file")
        text = _model_json(model)
        if text is not None:
            arrays[MODEL_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        with path.open("wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        return path.stat().st_size
    raise ValueError(f"cannot write format {fmt!r} here (npz or safetensors)")


def read_model_file(path: str | Path, *, limits: Limits = DEFAULT_LIMITS) -> ModelFile:
    """The tensors (and recorded model object) of an ``.npz``, ``.safetensors`` or wire-format
    file, chosen by content (a zip, a wire ``FEDG`` prefix, else safetensors)."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                text = None
                if MODEL_KEY in names:
                    text = archive[MODEL_KEY].astype(np.uint8).tobytes().decode("utf-8")
                arrays = {n: archive[n] for n in names if n != MODEL_KEY}
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
        return ModelFile(_float32(arrays), _parse_model(text, str(path)))
    if data[:4] == b"FEDG":
        return ModelFile(decode_model(data, limits=limits), None)
    weights, metadata = decode_safetensors(data, limits=limits)
    return ModelFile(weights, _parse_model(metadata.get(METADATA_MODEL), str(path)))
