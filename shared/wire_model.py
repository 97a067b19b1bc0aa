"""Models for download (coordinator -> device): dense float32 or float16 tensors.

Layout (docs/wire-format.md has the tables)::

    prefix (magic "FEDG", version u16, kind u8 = 2, flags u8 = 0) | num_tensors var
    | descriptors (fedge.shared.wirelayout; index coding 0, value coding f32 or f16)
    | value sections, in descriptor order
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from fedge.shared.compression import as_float32
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire_sections import decode_values, join_sections
from fedge.shared.wirelayout import (
    FORMAT_VERSION,
    KIND_MODEL,
    MAGIC,
    PREFIX,
    VALUE_F16,
    VALUE_F32,
    Descriptor,
    Reader,
    as_bytes_view,
    check_spec,
    encode_varint,
    read_descriptors,
    read_prefix,
)

__all__ = ["decode_model", "encode_model"]

_F16_MAX = float(np.finfo(np.float16).max)


def encode_model(
    weights: Mapping[str, np.ndarray],
    *,
    dtype: Literal["f32", "f16"] = "f32",
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Serialize dense weights as float32 or float16.

    ``ValueError`` for NaN/Inf, non-float arrays, or (f16) values beyond float16's range.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping of tensor name -> array")
    arrays = {name: as_float32(name, a) for name, a in weights.items()}
    spec = ModelSpec.from_dict(
        [{"name": n, "shape": list(a.shape)} for n, a in arrays.items()], limits=limits
    )
    parts: list[bytes] = [
        PREFIX.pack(MAGIC, FORMAT_VERSION, KIND_MODEL, 0),
        encode_varint(len(arrays)),
    ]
    sections: list[np.ndarray] = []
    for t in spec.tensors:
        a = arrays[t.name].reshape(-1)
        if dtype == "f16":
            with np.errstate(over="ignore"):
                values = a.astype("<f2")
            if not np.isfinite(values).all():
                worst = float(np.abs(a).max())
                raise ValueError(
                    f"tensor {t.name!r}: |value| up to {worst:g} overflows float16 "
                    f"(max {_F16_MAX:g}); use dtype='f32'"
                )
            vc = VALUE_F16
        else:
            values, vc = a.astype("<f4", copy=False), VALUE_F32
        parts.append(Descriptor(t.name, t.shape, 0, vc, 0, t.size, 0, values.nbytes).pack())
        sections.append(values)
    return join_sections(parts, sections)


def decode_model(
    data: bytes | bytearray | memoryview,
    *,
    spec: ModelSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Weights:
    """Parse and validate a model blob into float32 arrays (``WireFormatError`` on problems)."""
    reader = Reader(as_bytes_view(data))
    read_prefix(reader, KIND_MODEL)
    count = reader.varint("num_tensors")
    descs = read_descriptors(reader, count, limits, kind=KIND_MODEL)
    if spec is not None:
        check_spec(descs, spec)
    out: Weights = {}
    for d in descs:
        values = decode_values(reader.take(d.value_bytes, "value section"), d, bits=32, chunk=1)
        out[d.name] = values.reshape(d.shape)
    return out
