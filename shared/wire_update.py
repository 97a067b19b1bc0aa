"""Model updates (device -> coordinator): compressed tensors, codec parameters and metrics.

Layout (docs/wire-format.md has the tables; ``var`` is an unsigned LEB128 varint in its
shortest form)::

    prefix: magic "FEDG" | version u16 | kind u8 = 1 | flags u8 (bit 0: metrics block)
    header: task_id var | base_version var | num_examples var | bits u8 | scope u8 | chunk var
            | topk_fraction as m var, e var (m * 10**-e) | num_tensors var
            | metrics block when flag bit 0 (fedge.shared.wiremetrics)
    descriptors (fedge.shared.wirelayout), then for each tensor its index and value sections

Decoders validate everything and raise :class:`WireFormatError` with a stable code; encoders
raise ``ValueError`` for invalid input (NaN, wrong dtypes, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fedge.shared.compression import CompressedUpdate
from fedge.shared.indexcoding import decode_indices, encode_indices
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import ALLOWED_BITS, CompressionPolicy
from fedge.shared.quantize import pack_codes
from fedge.shared.topk import topk_count
from fedge.shared.warmup import topk_fraction_at
from fedge.shared.wire_sections import decode_values, join_sections
from fedge.shared.wireerror import WireFormatError
from fedge.shared.wirelayout import (
    FORMAT_VERSION,
    KIND_UPDATE,
    MAGIC,
    MAX_ID,
    PREFIX,
    SCOPE_CODES,
    SCOPE_NAMES,
    VALUE_F32,
    VALUE_QUANT,
    Descriptor,
    Reader,
    as_bytes_view,
    check_spec,
    encode_fraction,
    encode_varint,
    read_descriptors,
    read_prefix,
)
from fedge.shared.wiremetrics import FLAG_METRICS, encode_metrics, read_metrics

__all__ = [
    "DecodedTensor",
    "DecodedUpdate",
    "UpdateHeader",
    "decode_update",
    "encode_update",
    "peek_update_header",
    "update_overhead_bytes",
]


class UpdateHeader(NamedTuple):
    task_id: int
    base_version: int
    num_examples: int


@dataclass
class DecodedTensor:
    """One decoded tensor: flat sorted unique int64 ``indices`` (``None`` = dense) and values."""

    name: str
    shape: tuple[int, ...]
    indices: np.ndarray | None
    values: np.ndarray

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class DecodedUpdate:
    """A validated update, ready to be aggregated with :meth:`add_to`."""

    task_id: int
    base_version: int
    num_examples: int
    bits: int
    chunk: int
    topk_fraction: float
    tensors: list[DecodedTensor]
    scope: str = field(default="tensor")
    #: What the device measured (the metrics block; names in
    #: ``fedge.shared.wiremetrics.METRIC_KEYS``).
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return sum(int(t.values.size) for t in self.tensors)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict([{"name": t.name, "shape": list(t.shape)} for t in self.tensors])

    def to_dense(self) -> Weights:
        """Dense float32 tensors (zeros where the update carries nothing)."""
        out: Weights = {}
        for t in self.tensors:
            if t.indices is None:
                dense = t.values.copy()
            else:
                dense = np.zeros(t.size, dtype=np.float32)
                dense[t.indices] = t.values
            out[t.name] = dense.reshape(t.shape)
        return out

    def add_to(self, acc: Mapping[str, np.ndarray], weight: float) -> None:
        """``acc[name].flat[indices] += weight * values`` for every tensor, in O(nnz).

        ``acc`` holds C-contiguous float arrays of the update's shapes (float64 is fine; the
        product is formed in the accumulator's dtype). ``ValueError`` if a tensor is missing or
        has another shape; then nothing has been added.
        """
        targets = []
        for t in self.tensors:
            a = acc.get(t.name)
            if a is None or a.shape != t.shape:
                got = None if a is None else a.shape
                raise ValueError(f"accumulator for {t.name!r} has shape {got}, need {t.shape}")
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise ValueError(f"accumulator for {t.name!r} must be writable and C-contiguous")
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"accumulator for {t.name!r} must have a floating dtype")
            targets.append(a.reshape(-1))
        for t, flat in zip(self.tensors, targets, strict=True):
            contribution = np.multiply(t.values, weight, dtype=flat.dtype)
            if t.indices is None:
                flat += contribution
            else:
                flat[t.indices] += contribution


def _check_id(name: str, value: int, *, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= MAX_ID:
        raise ValueError(f"{name} must be in [{minimum}, 2**63), got {value}")


def encode_update(
    c: CompressedUpdate,
    *,
    task_id: int,
    base_version: int,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Serialize a compressed update (``ValueError`` if it is inconsistent or out of limits).
    ``metrics`` (names in :data:`fedge.shared.wiremetrics.METRIC_KEYS`) travel in the update's
    metrics block, so the device needs no separate report."""
    block = encode_metrics(metrics or {})
    _check_id("task_id", task_id)
    _check_id("base_version", base_version)
    _check_id("num_examples", num_examples, minimum=1)
    CompressionPolicy(topk_fraction=c.topk_fraction, bits=c.bits, chunk=c.chunk, scope=c.scope)
    if not c.tensors:
        raise ValueError("an update must hold at least one tensor")
    try:
        ModelSpec.from_dict(
            [{"name": t.name, "shape": list(t.shape)} for t in c.tensors], limits=limits
        )
    except ValueError as exc:
        raise ValueError(f"update tensors: {exc}") from None
    flags = FLAG_METRICS if block else 0
    parts: list[bytes] = [
        PREFIX.pack(MAGIC, FORMAT_VERSION, KIND_UPDATE, flags),
        encode_varint(int(task_id)),
        encode_varint(int(base_version)),
        encode_varint(int(num_examples)),
        encode_codec(c),
        block,
    ]
    return join_tensor_sections(parts, c)


def encode_codec(c: CompressedUpdate) -> bytes:
    """bits u8 | scope u8 | chunk var | topk_fraction | num_tensors var."""
    return b"".join(
        (
            bytes([c.bits, SCOPE_CODES[c.scope]]),
            encode_varint(c.chunk),
            encode_fraction(c.topk_fraction),
            encode_varint(len(c.tensors)),
        )
    )


def join_tensor_sections(parts: list[bytes], c: CompressedUpdate) -> bytes:
    """``parts`` (prefix and header), then the descriptors and sections of ``c``'s tensors."""
    sections: list[np.ndarray] = []
    for t in c.tensors:
        t.validate(bits=c.bits, chunk=c.chunk)
        if t.indices is None:
            coding, param, ibytes = 0, 0, np.empty(0, dtype=np.uint8)
        else:
            enc = encode_indices(t.indices.astype(np.int64, copy=False), t.size)
            coding, param, ibytes = enc.coding, enc.param, enc.data
        if c.bits == 32:
            assert t.values is not None
            vc, vparts = VALUE_F32, [t.values.astype("<f4", copy=False)]
        else:
            q = t.quantized
            assert q is not None
            vc = VALUE_QUANT
            vparts = [q.scales.astype("<f4", copy=False), pack_codes(q.codes, c.bits)]
        vbytes = sum(int(p.nbytes) for p in vparts)
        d = Descriptor(t.name, t.shape, coding, vc, param, t.nnz, ibytes.nbytes, vbytes)
        parts.append(d.pack())
        sections.append(ibytes)
        sections.extend(vparts)
    return join_sections(parts, sections)


class Codec(NamedTuple):
    bits: int
    chunk: int
    scope: str
    fraction: float
    num_tensors: int


def read_codec(reader: Reader, limits: Limits) -> Codec:
    """The fields :func:`encode_codec` wrote, checked."""
    bits = reader.u8("bits")
    scope = reader.u8("scope")
    chunk = reader.varint("chunk")
    fraction = reader.fraction("topk_fraction")
    count = reader.varint("num_tensors")
    if bits not in ALLOWED_BITS:
        raise WireFormatError("bad_header", f"bits must be one of {ALLOWED_BITS}, got {bits}")
    if scope not in SCOPE_NAMES:
        raise WireFormatError("bad_header", f"unknown top-k scope {scope}")
    if chunk == 0:
        raise WireFormatError("bad_header", "chunk must be at least 1")
    if chunk > limits.max_chunk:
        raise WireFormatError("limit_exceeded", f"chunk {chunk}, the limit is {limits.max_chunk}")
    return Codec(int(bits), int(chunk), SCOPE_NAMES[scope], fraction, int(count))


def read_tensor_sections(
    reader: Reader, descs: list[Descriptor], *, bits: int, chunk: int
) -> list[DecodedTensor]:
    """Decode the index and value sections behind ``descs`` (the last part of the blob)."""
    tensors: list[DecodedTensor] = []
    for d in descs:
        ibuf = np.frombuffer(reader.take(d.index_bytes, "index section"), dtype=np.uint8)
        indices = decode_indices(d.index_coding, d.index_param, ibuf, d.nnz, d.size)
        vview = reader.take(d.value_bytes, "value section")
        values = decode_values(vview, d, bits=bits, chunk=chunk)
        tensors.append(DecodedTensor(d.name, d.shape, indices, values))
    return tensors


class _UpdateHead(NamedTuple):
    header: UpdateHeader
    bits: int
    chunk: int
    scope: str
    fraction: float
    num_tensors: int
    metrics: dict[str, float]


def _read_update_header(reader: Reader, limits: Limits) -> _UpdateHead:
    flags = read_prefix(reader, KIND_UPDATE, allowed_flags=FLAG_METRICS)
    task = reader.varint("task_id")
    base = reader.varint("base_version")
    examples = reader.varint("num_examples")
    codec = read_codec(reader, limits)
    metrics = read_metrics(reader) if flags & FLAG_METRICS else {}
    if task > MAX_ID or base > MAX_ID:
        raise WireFormatError("bad_header", "task id and base version must be below 2**63")
    if not 1 <= examples <= MAX_ID:
        raise WireFormatError("bad_header", f"num_examples must be in [1, 2**63), got {examples}")
    header = UpdateHeader(int(task), int(base), int(examples))
    return _UpdateHead(
        header, codec.bits, codec.chunk, codec.scope, codec.fraction, codec.num_tensors, metrics
    )


def peek_update_header(data: bytes | bytearray | memoryview) -> UpdateHeader:
    """``(task_id, base_version, num_examples)`` from the header only (cheap).

    Validates the header (magic, version, kind, field ranges, metrics block) but not the
    tensors; a full :func:`decode_update` is still needed before the update is used. Reads at
    most 80 bytes of prefix and header (seven varints of at most 10 bytes) plus a metrics
    block of at most 32.
    """
    return _read_update_header(Reader(as_bytes_view(data)), DEFAULT_LIMITS).header


def _read_update_descriptors(
    reader: Reader, limits: Limits
) -> tuple[_UpdateHead, list[Descriptor]]:
    head = _read_update_header(reader, limits)
    descs = read_descriptors(
        reader, head.num_tensors, limits, kind=KIND_UPDATE, bits=head.bits, chunk=head.chunk
    )
    return head, descs


def update_overhead_bytes(data: bytes | bytearray | memoryview) -> int:
    """Bytes of a valid update before its first section: prefix, header and descriptors.

    Checks the header and descriptors like :func:`decode_update` (``WireFormatError``), but
    not the sections.
    """
    reader = Reader(as_bytes_view(data))
    _read_update_descriptors(reader, DEFAULT_LIMITS)
    return reader.pos


def _check_policy(
    descs: list[Descriptor],
    policy: CompressionPolicy,
    *,
    bits: int,
    chunk: int,
    scope: str,
    base_version: int,
) -> None:
    """``policy_mismatch`` unless the codec parameters are the policy's and no tensor (scope
    ``tensor``) or the whole update (scope ``global``) carries more values than the policy's
    fraction for ``base_version`` allows (``topk_fraction`` itself after the top-k warm-up)."""
    if bits != policy.bits:
        raise WireFormatError(
            "policy_mismatch", f"{bits}-bit values, the policy says {policy.bits}"
        )
    if chunk != policy.chunk:
        raise WireFormatError("policy_mismatch", f"chunk {chunk}, the policy says {policy.chunk}")
    if scope != policy.scope:
        raise WireFormatError(
            "policy_mismatch", f"scope {scope!r}, the policy says {policy.scope!r}"
        )
    f = topk_fraction_at(policy, base_version)
    if policy.scope == "tensor":
        for d in descs:
            k = topk_count(d.size, f)
            if d.nnz > k:
                raise WireFormatError(
                    "policy_mismatch", f"tensor {d.name!r} carries {d.nnz} values, at most {k}"
                )
    else:
        total = sum(d.size for d in descs)
        nnz = sum(d.nnz for d in descs)
        k = topk_count(total, f)
        if nnz > k:
            raise WireFormatError(
                "policy_mismatch", f"the update carries {nnz} values, at most {k}"
            )


def decode_update(
    data: bytes | bytearray | memoryview,
    *,
    spec: ModelSpec | None = None,
    policy: CompressionPolicy | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> DecodedUpdate:
    """Parse and fully validate an update; ``WireFormatError`` on any problem.

    With ``spec`` the tensors must match it (``shape_mismatch``); with ``policy`` the codec
    parameters must equal the policy's and no tensor (scope ``tensor``) or the whole update
    (scope ``global``) may carry more than ``ceil(f * size)`` values (``policy_mismatch``),
    ``f`` being the policy's fraction for the update's base version
    (``fedge.shared.warmup.topk_fraction_at``: ``topk_fraction`` once any top-k warm-up is
    over). Both checks run before any section is decoded.
    """
    reader = Reader(as_bytes_view(data))
    head, descs = _read_update_descriptors(reader, limits)
    bits, chunk, scope = head.bits, head.chunk, head.scope
    if spec is not None:
        check_spec(descs, spec)
    if policy is not None:
        _check_policy(
            descs,
            policy,
            bits=bits,
            chunk=chunk,
            scope=scope,
            base_version=head.header.base_version,
        )
    tensors = read_tensor_sections(reader, descs, bits=bits, chunk=chunk)
    return DecodedUpdate(
        task_id=head.header.task_id,
        base_version=head.header.base_version,
        num_examples=head.header.num_examples,
        bits=bits,
        chunk=chunk,
        topk_fraction=head.fraction,
        tensors=tensors,
        scope=scope,
        metrics=head.metrics,
    )
