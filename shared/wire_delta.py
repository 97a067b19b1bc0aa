"""Model deltas (coordinator -> device): compressed changes between broadcast model versions.

A delta carries what changed from the broadcast model of ``from_version`` to that of
``to_version``, compressed like an update (top-k indices, quantized values), plus the SHA-256
digest of the model it rebuilds (:func:`fedge.shared.broadcast.weights_digest`), so a device
checks what it rebuilt. A chain carries several consecutive deltas in one body.

Layout (docs/wire-format.md has the tables)::

    delta: prefix (magic, version, kind u8 = 3, flags 0) | task_id var | from_version var
           | to_version var | digest 32 bytes | bits u8 | scope u8 | chunk var
           | topk_fraction | num_tensors var | descriptors | sections (as in an update)
    chain: prefix (kind u8 = 4, flags 0) | count var | count x (length var | delta)
"""

from __future__ import annotations

from dataclasses import dataclass

from fedge.shared.compression import CompressedUpdate
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire_update import (
    DecodedTensor,
    encode_codec,
    join_tensor_sections,
    read_codec,
    read_tensor_sections,
)
from fedge.shared.wireerror import WireFormatError
from fedge.shared.wirelayout import (
    FORMAT_VERSION,
    KIND_CHAIN,
    KIND_DELTA,
    KIND_UPDATE,
    MAGIC,
    MAX_ID,
    PREFIX,
    Reader,
    as_bytes_view,
    check_spec,
    encode_varint,
    read_descriptors,
    read_prefix,
)

__all__ = [
    "DIGEST_BYTES",
    "MAX_CHAIN",
    "WORK_FRAME_MEDIA_TYPE",
    "DecodedDelta",
    "decode_chain",
    "decode_delta",
    "decode_work_frame",
    "encode_chain",
    "encode_delta",
    "encode_work_frame",
    "with_digest",
]

DIGEST_BYTES = 32
#: Most deltas in one chain (a longer chain is never smaller than the full model).
MAX_CHAIN = 4096


@dataclass
class DecodedDelta:
    task_id: int
    from_version: int
    to_version: int
    digest: bytes
    tensors: list[DecodedTensor]


def _check_version(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")


def encode_delta(
    c: CompressedUpdate,
    *,
    task_id: int,
    from_version: int,
    to_version: int,
    digest: bytes = bytes(DIGEST_BYTES),
) -> bytes:
    """Serialize a compressed delta (``ValueError`` for inconsistent input)."""
    _check_version("task_id", task_id)
    _check_version("from_version", from_version)
    _check_version("to_version", to_version)
    if to_version <= from_version:
        raise ValueError(f"a delta goes forward: {from_version} -> {to_version}")
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"digest must be {DIGEST_BYTES} bytes, got {len(digest)}")
    if not c.tensors:
        raise ValueError("a delta must hold at least one tensor")
    parts = [
        PREFIX.pack(MAGIC, FORMAT_VERSION, KIND_DELTA, 0),
        encode_varint(task_id),
        encode_varint(from_version),
        encode_varint(to_version),
        bytes(digest),
        encode_codec(c),
    ]
    return join_tensor_sections(parts, c)


def _digest_offset(data: bytes) -> int:
    reader = Reader(as_bytes_view(data))
    read_prefix(reader, KIND_DELTA)
    for what in ("task_id", "from_version", "to_version"):
        reader.varint(what)
    return reader.pos


def with_digest(data: bytes, digest: bytes) -> bytes:
    """``data`` (an encoded delta) with its digest field replaced by ``digest``."""
    if len(digest) != DIGEST_BYTES:
        raise ValueError(f"digest must be {DIGEST_BYTES} bytes, got {len(digest)}")
    at = _digest_offset(data)
    return data[:at] + bytes(digest) + data[at + DIGEST_BYTES :]


def _read_delta(reader: Reader, spec: ModelSpec | None, limits: Limits) -> DecodedDelta:
    read_prefix(reader, KIND_DELTA)
    task = reader.varint("task_id")
    start = reader.varint("from_version")
    end = reader.varint("to_version")
    digest = bytes(reader.take(DIGEST_BYTES, "digest"))
    codec = read_codec(reader, limits)
    if task > MAX_ID or end > MAX_ID:
        raise WireFormatError("bad_header", "task id and versions must be below 2**63")
    if end <= start:
        raise WireFormatError("bad_header", f"a delta goes forward, not {start} -> {end}")
    descs = read_descriptors(
        reader, codec.num_tensors, limits, kind=KIND_UPDATE, bits=codec.bits, chunk=codec.chunk
    )
    if spec is not None:
        check_spec(descs, spec)
    tensors = read_tensor_sections(reader, descs, bits=codec.bits, chunk=codec.chunk)
    return DecodedDelta(int(task), int(start), int(end), digest, tensors)


def decode_delta(
    data: bytes | bytearray | memoryview,
    *,
    spec: ModelSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> DecodedDelta:
    """Parse and validate one delta (``WireFormatError``); with ``spec`` its tensors must
    match it (``shape_mismatch``) before any section is decoded."""
    reader = Reader(as_bytes_view(data))
    delta = _read_delta(reader, spec, limits)
    if reader.remaining:
        raise WireFormatError("trailing_bytes", f"{reader.remaining} bytes after the delta")
    return delta


def encode_chain(deltas: list[bytes]) -> bytes:
    """Consecutive encoded deltas as one body."""
    if not 1 <= len(deltas) <= MAX_CHAIN:
        raise ValueError(f"a chain holds 1 to {MAX_CHAIN} deltas, got {len(deltas)}")
    parts = [PREFIX.pack(MAGIC, FORMAT_VERSION, KIND_CHAIN, 0), encode_varint(len(deltas))]
    for d in deltas:
        parts.append(encode_varint(len(d)))
        parts.append(bytes(d))
    return b"".join(parts)


def decode_chain(
    data: bytes | bytearray | memoryview,
    *,
    spec: ModelSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[DecodedDelta]:
    """Parse a chain; each delta must start where the one before it ended
    (``chain_mismatch``) and belong to the same task."""
    reader = Reader(as_bytes_view(data))
    read_prefix(reader, KIND_CHAIN)
    count = reader.varint("count")
    if not 1 <= count <= MAX_CHAIN:
        raise WireFormatError("limit_exceeded", f"a chain of {count} deltas (1..{MAX_CHAIN})")
    out: list[DecodedDelta] = []
    for i in range(count):
        length = reader.varint(f"length of delta {i}")
        body = reader.take(length, f"delta {i}")
        delta = decode_delta(body, spec=spec, limits=limits)
        if out and (delta.from_version != out[-1].to_version or delta.task_id != out[-1].task_id):
            raise WireFormatError(
                "chain_mismatch",
                f"delta {i} goes {delta.from_version} -> {delta.to_version} (task "
                f"{delta.task_id}) after one ending at {out[-1].to_version} (task "
                f"{out[-1].task_id})",
            )
        out.append(delta)
    if reader.remaining:
        raise WireFormatError("trailing_bytes", f"{reader.remaining} bytes after the chain")
    return out


#: Media type of a work answer that carries its base model's delta chain.
WORK_FRAME_MEDIA_TYPE = "application/x-fedge-work"


def encode_work_frame(answer: bytes, chain: bytes) -> bytes:
    """A work answer (its JSON bytes) followed by the delta chain to its base model, so the
    device needs no separate download request: ``length var | JSON | chain``."""
    return encode_varint(len(answer)) + bytes(answer) + bytes(chain)


def decode_work_frame(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """``(JSON bytes, chain bytes)`` of a work frame (``WireFormatError`` when the declared
    JSON length exceeds the body or no chain follows)."""
    reader = Reader(as_bytes_view(data))
    length = reader.varint("answer length")
    answer = bytes(reader.take(length, "work answer"))
    if not reader.remaining:
        raise WireFormatError("truncated", "a work frame without its delta chain")
    return answer, bytes(reader.take(reader.remaining, "delta chain"))
