"""Hand-built blobs for wire-format tests: every header field and section can be set freely,
so tests can produce exactly the malformed input they mean to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.shared.limits import Limits
from fedge.shared.wire_update import _read_update_descriptors
from fedge.shared.wirelayout import (
    FORMAT_VERSION,
    KIND_MODEL,
    KIND_UPDATE,
    MAGIC,
    PREFIX,
    Descriptor,
    Reader,
    as_bytes_view,
    encode_varint,
)


@dataclass
class RawTensor:
    """A tensor as raw descriptor fields and section bytes (``None`` = consistent default).

    ``index_bytes`` is only sent for Rice; every other section length follows from the
    descriptor, so a wrong one is a truncated or trailing input rather than a descriptor."""

    name: str = "w"
    shape: tuple[int, ...] = (4,)
    index_coding: int = 0
    value_coding: int = 0
    param: int = 0
    nnz: int | None = None
    index: bytes = b""
    values: bytes | None = None
    index_bytes: int | None = None
    raw_name: bytes | None = None

    def descriptor_bytes(self) -> bytes:
        nnz = math.prod(self.shape) if self.nnz is None else self.nnz
        d = Descriptor(
            self.name,
            self.shape,
            self.index_coding,
            self.value_coding,
            self.param,
            nnz,
            len(self.index) if self.index_bytes is None else self.index_bytes,
            len(self.section_values()),
        )
        packed = d.pack()
        if self.raw_name is not None:
            name = self.name.encode()
            cut = len(encode_varint(len(name))) + len(name)
            packed = encode_varint(len(self.raw_name)) + self.raw_name + packed[cut:]
        return packed

    def section_values(self) -> bytes:
        if self.values is not None:
            return self.values
        return np.arange(math.prod(self.shape), dtype="<f4").tobytes()


def var(value: int | bytes) -> bytes:
    """A varint, or ``bytes`` taken verbatim (to craft malformed varints)."""
    return value if isinstance(value, bytes) else encode_varint(value)


def prefix(
    *,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    kind: int = KIND_UPDATE,
    flags: int = 0,
) -> bytes:
    return PREFIX.pack(magic, version, kind, flags)


def update_header(
    *,
    task: int | bytes = 1,
    base: int | bytes = 0,
    examples: int | bytes = 1,
    bits: int = 32,
    scope: int = 0,
    chunk: int | bytes = 256,
    mantissa: int | bytes = 1,
    exponent: int | bytes = 0,
    count: int | bytes | None = None,
    tensors: int = 1,
) -> bytes:
    """The header after the prefix; the top-k fraction is ``mantissa * 10**-exponent``."""
    n = tensors if count is None else count
    fields = [var(task), var(base), var(examples), bytes([bits, scope]), var(chunk)]
    return b"".join([*fields, var(mantissa), var(exponent), var(n)])


def update_blob(
    tensors: list[RawTensor] | None = None,
    *,
    head: dict[str, object] | None = None,
    descriptors: list[bytes] | None = None,
    metrics: bytes = b"",
    **fields: object,
) -> bytes:
    """An update blob: ``head`` overrides the prefix, ``fields`` the header, ``metrics`` is put
    verbatim after the header (set ``head={"flags": 1}`` to announce it), ``descriptors``
    (raw bytes) replace the descriptors built from ``tensors``."""
    tensors = [RawTensor()] if tensors is None else tensors
    out = prefix(**(head or {}))  # type: ignore[arg-type]
    out += update_header(tensors=len(tensors), **fields)  # type: ignore[arg-type]
    out += metrics
    if descriptors is None:
        descriptors = [t.descriptor_bytes() for t in tensors]
    out += b"".join(descriptors)
    out += b"".join(t.index + t.section_values() for t in tensors)
    return out


def model_blob(
    tensors: list[RawTensor] | None = None,
    *,
    count: int | bytes | None = None,
    head: dict[str, object] | None = None,
) -> bytes:
    """A model blob: ``head`` overrides the prefix, ``count`` the number of tensors."""
    tensors = [RawTensor()] if tensors is None else tensors
    out = prefix(**{"kind": KIND_MODEL, **(head or {})})  # type: ignore[arg-type]
    out += var(len(tensors) if count is None else count)
    out += b"".join(t.descriptor_bytes() for t in tensors)
    out += b"".join(t.index + t.section_values() for t in tensors)
    return out


def descriptors_of(blob: bytes) -> list[Descriptor]:
    """The descriptors of a valid update blob (to see which codings the encoder chose)."""
    return _read_update_descriptors(Reader(as_bytes_view(blob)), Limits())[1]
