"""Byte layout of fedge blobs: fixed headers, tensor descriptors, and a bounds-checked reader.

See docs/wire-format.md for the tables. Everything is little-endian. Parsing checks each
declared count and length against :class:`~shared.limits.Limits` and against the bytes that
remain *before* anything proportional to it is allocated.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cache

from shared.indexcoding import ALL, index_section_bounds
from shared.limits import Limits
from shared.quantize import packed_size
from shared.wireerror import WireFormatError

MAGIC = b"FEDG"
FORMAT_VERSION = 1
KIND_UPDATE, KIND_MODEL = 1, 2
KIND_NAMES = {KIND_UPDATE: "update", KIND_MODEL: "model"}
VALUE_F32, VALUE_F16, VALUE_QUANT = 0, 1, 2
VALUE_NAMES = {VALUE_F32: "f32", VALUE_F16: "f16", VALUE_QUANT: "quant"}
SCOPE_CODES = {"tensor": 0, "global": 1}
SCOPE_NAMES = {v: k for k, v in SCOPE_CODES.items()}
#: task ids, versions and example counts must fit a signed 64-bit database column.
MAX_ID = (1 << 63) - 1

PREFIX = struct.Struct("<4sHBB")  # magic, version, kind, flags
UPDATE_FIXED = struct.Struct("<QQQBBHIdI")  # task, base, examples, bits, scope, 0, chunk, f, n
MODEL_FIXED = struct.Struct("<I")  # number of tensors
NAME_LEN = struct.Struct("<H")
NDIM = struct.Struct("<B")
DESC_TAIL = struct.Struct("<BBBIQQ")  # index coding, value coding, param, nnz, ibytes, vbytes
#: A descriptor with a one-byte name and no dimensions.
MIN_DESCRIPTOR_BYTES = NAME_LEN.size + 1 + NDIM.size + DESC_TAIL.size
UPDATE_HEADER_BYTES = PREFIX.size + UPDATE_FIXED.size


@cache
def dims_struct(ndim: int) -> struct.Struct:
    return struct.Struct(f"<{ndim}I")


@dataclass(frozen=True)
class Descriptor:
    """What a blob declares about one tensor before its section."""

    name: str
    shape: tuple[int, ...]
    index_coding: int
    value_coding: int
    index_param: int
    nnz: int
    index_bytes: int
    value_bytes: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def pack(self) -> bytes:
        name = self.name.encode("utf-8")
        return b"".join(
            (
                NAME_LEN.pack(len(name)),
                name,
                NDIM.pack(len(self.shape)),
                dims_struct(len(self.shape)).pack(*self.shape),
                DESC_TAIL.pack(
                    self.index_coding,
                    self.value_coding,
                    self.index_param,
                    self.nnz,
                    self.index_bytes,
                    self.value_bytes,
                ),
            )
        )


def value_section_bytes(value_coding: int, count: int, *, bits: int, chunk: int) -> int:
    """Exact byte length of a value section holding ``count`` values."""
    if value_coding == VALUE_F32:
        return 4 * count
    if value_coding == VALUE_F16:
        return 2 * count
    return 4 * (-(-count // chunk)) + packed_size(count, bits)


class Reader:
    """Sequential reads over a byte buffer; running short raises ``truncated``."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise WireFormatError(
                "truncated", f"{what} needs {n} bytes, only {self.remaining} remain"
            )

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        self.need(st.size, what)
        values = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return values


def as_bytes_view(data: object) -> memoryview:
    """A flat byte view of ``bytes``, ``bytearray``, ``memoryview`` or a uint8 array."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"expected a bytes-like object, got {type(data).__name__}") from None
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def read_prefix(reader: Reader, expected_kind: int) -> None:
    """Check magic, version, kind and flags."""
    head = bytes(reader.data[:4])
    if head != MAGIC[: len(head)]:
        raise WireFormatError("bad_magic", f"expected {MAGIC!r}, got {head!r}")
    _magic, version, kind, flags = reader.unpack(PREFIX, "header")
    if version != FORMAT_VERSION:
        raise WireFormatError(
            "unsupported_version", f"format version {version}, this decoder reads 1"
        )
    if kind not in KIND_NAMES:
        raise WireFormatError("bad_header", f"unknown blob kind {kind}")
    if kind != expected_kind:
        raise WireFormatError(
            "wrong_kind",
            f"expected a {KIND_NAMES[expected_kind]}, got a {KIND_NAMES[kind]}",
        )
    if flags != 0:
        raise WireFormatError("bad_header", f"reserved flags must be 0, got {flags}")


def _allowed_values(kind: int, bits: int) -> tuple[int, ...]:
    if kind == KIND_MODEL:
        return (VALUE_F32, VALUE_F16)
    return (VALUE_F32,) if bits == 32 else (VALUE_QUANT,)


def read_descriptors(
    reader: Reader, count: int, limits: Limits, *, kind: int, bits: int = 32, chunk: int = 1
) -> list[Descriptor]:
    """Parse and validate ``count`` descriptors, then check the section lengths add up."""
    if count == 0:
        raise WireFormatError("bad_header", "a blob must hold at least one tensor")
    if count > limits.max_tensors:
        raise WireFormatError(
            "limit_exceeded", f"{count} tensors, the limit is {limits.max_tensors}"
        )
    reader.need(count * MIN_DESCRIPTOR_BYTES, f"{count} tensor descriptors")
    allowed = _allowed_values(kind, bits)
    out: list[Descriptor] = []
    names: set[str] = set()
    total = 0
    for i in range(count):
        (name_len,) = reader.unpack(NAME_LEN, f"descriptor {i}")
        if name_len == 0:
            raise WireFormatError("bad_descriptor", f"tensor {i} has an empty name")
        if name_len > limits.max_name_bytes:
            raise WireFormatError(
                "limit_exceeded",
                f"tensor {i} name is {name_len} bytes, the limit is {limits.max_name_bytes}",
            )
        try:
            name = bytes(reader.take(name_len, f"tensor {i} name")).decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError("bad_descriptor", f"tensor {i} name is not UTF-8") from None
        if name in names:
            raise WireFormatError("bad_descriptor", f"duplicate tensor name {name!r}")
        names.add(name)
        (ndim,) = reader.unpack(NDIM, f"tensor {name!r} rank")
        if ndim > limits.max_ndim:
            raise WireFormatError(
                "limit_exceeded", f"tensor {name!r} has {ndim} dims, the limit is {limits.max_ndim}"
            )
        shape = tuple(reader.unpack(dims_struct(ndim), f"tensor {name!r} shape"))
        size = math.prod(shape)
        if size > limits.max_tensor_elements:
            raise WireFormatError(
                "limit_exceeded",
                f"tensor {name!r} has {size} elements, the limit is {limits.max_tensor_elements}",
            )
        total += size
        if total > limits.max_total_elements:
            raise WireFormatError(
                "limit_exceeded",
                f"more than the limit of {limits.max_total_elements} elements in total",
            )
        ic, vc, param, nnz, ibytes, vbytes = reader.unpack(DESC_TAIL, f"tensor {name!r} codec")
        d = Descriptor(name, shape, ic, vc, param, nnz, ibytes, vbytes)
        _check_descriptor(d, size, kind=kind, bits=bits, chunk=chunk, allowed=allowed)
        out.append(d)
    declared = sum(d.index_bytes + d.value_bytes for d in out)
    if declared > reader.remaining:
        raise WireFormatError(
            "truncated", f"sections need {declared} bytes, only {reader.remaining} remain"
        )
    if declared < reader.remaining:
        raise WireFormatError(
            "trailing_bytes", f"{reader.remaining - declared} bytes after the last section"
        )
    return out


def _check_descriptor(
    d: Descriptor, size: int, *, kind: int, bits: int, chunk: int, allowed: tuple[int, ...]
) -> None:
    what = f"tensor {d.name!r}"
    if d.nnz > size:
        raise WireFormatError("bad_descriptor", f"{what}: {d.nnz} values for {size} elements")
    if d.value_coding not in VALUE_NAMES:
        raise WireFormatError("unknown_encoding", f"{what}: unknown value coding {d.value_coding}")
    if d.value_coding not in allowed:
        raise WireFormatError(
            "bad_descriptor",
            f"{what}: value coding {VALUE_NAMES[d.value_coding]} is not allowed here",
        )
    expected = value_section_bytes(d.value_coding, d.nnz, bits=bits, chunk=chunk)
    if d.value_bytes != expected:
        raise WireFormatError(
            "bad_descriptor", f"{what}: value section is {d.value_bytes} bytes, expected {expected}"
        )
    if kind == KIND_MODEL and d.index_coding != ALL:
        raise WireFormatError("bad_descriptor", f"{what}: model tensors must be dense")
    lo, hi = index_section_bounds(d.index_coding, d.index_param, d.nnz, size)
    if not lo <= d.index_bytes <= hi:
        raise WireFormatError(
            "bad_descriptor", f"{what}: index section is {d.index_bytes} bytes, not in [{lo}, {hi}]"
        )
