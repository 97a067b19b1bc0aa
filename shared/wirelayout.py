"""Byte layout of fedge blobs: prefix, tensor descriptors, varints and a bounds-checked reader.

See docs/wire-format.md for the tables. Everything is little-endian; after the fixed 8-byte
prefix (magic, format version, kind, flags) integers are unsigned LEB128 varints in their
shortest form, and no length the decoder can compute is sent. There is one format version
(:data:`FORMAT_VERSION`); any other is ``unsupported_version``. Parsing checks each declared
count and length against :class:`~fedge.shared.limits.Limits` and against the bytes that remain
*before* anything proportional to it is allocated.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from decimal import Decimal

from fedge.shared.indexcoding import ALL, CODING_NAMES, RICE, index_section_bounds
from fedge.shared.limits import Limits
from fedge.shared.modelspec import ModelSpec
from fedge.shared.quantize import packed_size
from fedge.shared.wireerror import WireFormatError

MAGIC = b"FEDG"
#: The one format version: what the encoders write and the only one the decoders read.
FORMAT_VERSION = 2
KIND_UPDATE, KIND_MODEL, KIND_DELTA, KIND_CHAIN = 1, 2, 3, 4
KIND_NAMES = {
    KIND_UPDATE: "update",
    KIND_MODEL: "model",
    KIND_DELTA: "model delta",
    KIND_CHAIN: "delta chain",
}
VALUE_F32, VALUE_F16, VALUE_QUANT = 0, 1, 2
VALUE_NAMES = {VALUE_F32: "f32", VALUE_F16: "f16", VALUE_QUANT: "quant"}
SCOPE_CODES = {"tensor": 0, "global": 1}
SCOPE_NAMES = {v: k for k, v in SCOPE_CODES.items()}
#: task ids, versions and example counts must fit a signed 64-bit database column.
MAX_ID = (1 << 63) - 1
#: Largest dimension.
MAX_DIM = (1 << 32) - 1
#: A varint holds at most a u64: 10 bytes of 7 bits, the last byte 0 or 1.
MAX_VARINT_BYTES = 10
#: Top-k fraction ``m * 10**-e``: the shortest round-trip decimal has <= 17 digits, and a
#: fraction in (0, 1] has ``e <= 340`` (the smallest subnormal is 5e-324).
MAX_FRACTION_MANTISSA = 10**17 - 1
MAX_FRACTION_EXPONENT = 340

PREFIX = struct.Struct("<4sHBB")  # magic, version, kind, flags
#: The smallest descriptor: name length, a one-byte name, ndim 0, codings (dense: no nnz).
MIN_DESCRIPTOR_BYTES = 4


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant first, high bit = more follows."""
    if value < 0 or value >> 64:
        raise ValueError(f"a varint holds 0 .. 2**64 - 1, got {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def fraction_parts(fraction: float) -> tuple[int, int]:
    """``(m, e)`` with ``fraction == float(f"{m}e-{e}")``: the shortest decimal that
    round-trips (Python's ``repr``), without trailing zeros. Needs ``0 < fraction <= 1``."""
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"topk_fraction must be in (0, 1], got {fraction!r}")
    _sign, digits, exponent = Decimal(repr(float(fraction))).normalize().as_tuple()
    assert isinstance(exponent, int) and exponent <= 0
    return int("".join(map(str, digits))), -exponent


def encode_fraction(fraction: float) -> bytes:
    m, e = fraction_parts(fraction)
    return encode_varint(m) + encode_varint(e)


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
        """The descriptor's bytes. Lengths the decoder can compute (nnz of a dense tensor,
        index bytes of every coding but Rice, value bytes) are left out."""
        name = self.name.encode("utf-8")
        if any(d > MAX_DIM for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: dimensions must be below 2**32")
        parts = [encode_varint(len(name)), name, bytes([len(self.shape)])]
        parts.extend(encode_varint(d) for d in self.shape)
        parts.append(bytes([self.index_coding | self.value_coding << 4]))
        if self.index_coding != ALL:
            parts.append(encode_varint(self.nnz))
        if self.index_coding == RICE:
            parts.append(bytes([self.index_param]))
            parts.append(encode_varint(self.index_bytes))
        return b"".join(parts)


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

    def u8(self, what: str) -> int:
        self.need(1, what)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self, what: str) -> int:
        """One unsigned LEB128 integer (< 2**64), in its one shortest encoding."""
        value = 0
        for i in range(MAX_VARINT_BYTES):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if byte == 0 and i > 0:
                    raise WireFormatError("bad_varint", f"{what}: not in its shortest form")
                if i == MAX_VARINT_BYTES - 1 and byte > 1:
                    raise WireFormatError("bad_varint", f"{what}: overflows 64 bits")
                return value
        raise WireFormatError("bad_varint", f"{what}: longer than {MAX_VARINT_BYTES} bytes")

    def fraction(self, what: str) -> float:
        """A top-k fraction; only the canonical ``(m, e)`` of a value is accepted."""
        m = self.varint(f"{what} mantissa")
        e = self.varint(f"{what} exponent")
        if not (1 <= m <= MAX_FRACTION_MANTISSA and e <= MAX_FRACTION_EXPONENT):
            raise WireFormatError("bad_header", f"{what} {m}e-{e} is not in (0, 1]")
        value = float(f"{m}e-{e}")
        if not 0.0 < value <= 1.0:
            raise WireFormatError("bad_header", f"{what} {m}e-{e} is not in (0, 1]")
        if fraction_parts(value) != (m, e):
            raise WireFormatError(
                "bad_header", f"{what} {m}e-{e} is not the shortest decimal of {value!r}"
            )
        return value


def as_bytes_view(data: object) -> memoryview:
    """A flat byte view of ``bytes``, ``bytearray``, ``memoryview`` or a uint8 array."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"expected a bytes-like object, got {type(data).__name__}") from None
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def read_prefix(reader: Reader, expected_kind: int, *, allowed_flags: int = 0) -> int:
    """Check magic, version, kind and flags (only bits of ``allowed_flags`` may be set);
    return the flags."""
    head = bytes(reader.data[:4])
    if head != MAGIC[: len(head)]:
        raise WireFormatError("bad_magic", f"expected {MAGIC!r}, got {head!r}")
    _magic, version, kind, flags = reader.unpack(PREFIX, "header")
    if version != FORMAT_VERSION:
        raise WireFormatError(
            "unsupported_version",
            f"format version {version}, this decoder reads version {FORMAT_VERSION}",
        )
    if kind not in KIND_NAMES:
        raise WireFormatError("bad_header", f"unknown blob kind {kind}")
    if kind != expected_kind:
        raise WireFormatError(
            "wrong_kind",
            f"expected a {KIND_NAMES[expected_kind]}, got a {KIND_NAMES[kind]}",
        )
    if flags & ~allowed_flags:
        raise WireFormatError("bad_header", f"reserved flags must be 0, got {flags:#04x}")
    return int(flags)


def _allowed_values(kind: int, bits: int) -> tuple[int, ...]:
    if kind == KIND_MODEL:
        return (VALUE_F32, VALUE_F16)
    return (VALUE_F32,) if bits == 32 else (VALUE_QUANT,)


def read_descriptors(
    reader: Reader,
    count: int,
    limits: Limits,
    *,
    kind: int,
    bits: int = 32,
    chunk: int = 1,
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
        name_len = reader.varint(f"tensor {i} name length")
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
        ndim = reader.u8(f"tensor {name!r} rank")
        if ndim > limits.max_ndim:
            raise WireFormatError(
                "limit_exceeded", f"tensor {name!r} has {ndim} dims, the limit is {limits.max_ndim}"
            )
        shape = tuple(reader.varint(f"tensor {name!r} shape") for _ in range(ndim))
        if any(d > MAX_DIM for d in shape):
            raise WireFormatError(
                "limit_exceeded", f"tensor {name!r} has a dimension of 2**32 or more"
            )
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
        d = _read_codec(reader, name, shape, kind=kind, bits=bits, chunk=chunk, allowed=allowed)
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


def _read_codec(
    reader: Reader,
    name: str,
    shape: tuple[int, ...],
    *,
    kind: int,
    bits: int,
    chunk: int,
    allowed: tuple[int, ...],
) -> Descriptor:
    """The codec part of a descriptor, validated. Fields the decoder can compute are not in
    the blob: nnz of a dense tensor, index bytes of every coding but Rice, value bytes."""
    what = f"tensor {name!r}"
    size = math.prod(shape)
    codings = reader.u8(f"{what} codings")
    ic, vc = codings & 0x0F, codings >> 4
    if ic not in CODING_NAMES:
        raise WireFormatError("unknown_encoding", f"{what}: unknown index coding {ic}")
    if vc not in VALUE_NAMES:
        raise WireFormatError("unknown_encoding", f"{what}: unknown value coding {vc}")
    if vc not in allowed:
        raise WireFormatError(
            "bad_descriptor", f"{what}: value coding {VALUE_NAMES[vc]} is not allowed here"
        )
    if kind == KIND_MODEL and ic != ALL:
        raise WireFormatError("bad_descriptor", f"{what}: model tensors must be dense")
    nnz = size if ic == ALL else reader.varint(f"{what} nnz")
    if nnz > size:
        raise WireFormatError("bad_descriptor", f"{what}: {nnz} values for {size} elements")
    param = reader.u8(f"{what} index parameter") if ic == RICE else 0
    lo, hi = index_section_bounds(ic, param, nnz, size)
    ibytes = reader.varint(f"{what} index bytes") if ic == RICE else lo
    if not lo <= ibytes <= hi:
        raise WireFormatError(
            "bad_descriptor", f"{what}: index section is {ibytes} bytes, not in [{lo}, {hi}]"
        )
    vbytes = value_section_bytes(vc, nnz, bits=bits, chunk=chunk)
    return Descriptor(name, shape, ic, vc, param, nnz, ibytes, vbytes)


def check_spec(descs: list[Descriptor], spec: ModelSpec) -> None:
    """``shape_mismatch`` unless the descriptors name the tensors of ``spec``, in order."""
    got = [(d.name, d.shape) for d in descs]
    want = [(t.name, t.shape) for t in spec.tensors]
    if got != want:
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            if g != w:
                raise WireFormatError(
                    "shape_mismatch", f"tensor {i} is {g[0]!r} {g[1]}, expected {w[0]!r} {w[1]}"
                )
        raise WireFormatError(
            "shape_mismatch", f"{len(got)} tensors, the model spec has {len(want)}"
        )
