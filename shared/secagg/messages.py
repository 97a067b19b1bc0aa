"""Binary encodings of the secure-aggregation messages (layout: docs/secure-aggregation.md).

Every message is ``header | body``, little-endian::

    magic "FSAG" | version u8 (1) | kind u8 | reserved u16 (0) | round digest 32 bytes

The round digest (:attr:`RoundConfig.digest`) ties a message to one round's parameters. Every
decoder checks the header, then each declared count against the cohort size and the exact
remaining length, before it allocates anything; it raises
:class:`fedge.shared.wireerror.WireFormatError`. Fixed binary layouts only: no object
serialization, no JSON.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from fedge.shared.secagg.config import RoundConfig
from fedge.shared.secagg.shamir import ELEMENT_BYTES
from fedge.shared.wireerror import WireFormatError

__all__ = [
    "ADVERT_BYTES",
    "CIPHERTEXT_BYTES",
    "HEADER_BYTES",
    "SHARE_PLAINTEXT_BYTES",
    "Advert",
    "Kind",
    "SealedShare",
    "ShareKind",
    "UnmaskRequest",
    "decode_advert",
    "decode_advert_list",
    "decode_masked",
    "decode_shares",
    "decode_unmask_request",
    "decode_unmask_response",
    "encode_advert",
    "encode_advert_list",
    "encode_masked",
    "encode_shares",
    "encode_unmask_request",
    "encode_unmask_response",
]

MAGIC = b"FSAG"
VERSION = 1
_HEADER = struct.Struct("<4sBBH32s")
HEADER_BYTES = _HEADER.size
_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")


class Kind(IntEnum):
    ADVERT = 1
    ADVERT_LIST = 2
    SHARES_OUT = 3
    SHARES_IN = 4
    MASKED = 5
    UNMASK_REQUEST = 6
    UNMASK_RESPONSE = 7


class ShareKind(IntEnum):
    SELF_MASK_SEED = 1
    MASK_KEY = 2


@dataclass(frozen=True)
class Advert:
    """A device's round keys: ``c_pk`` (share encryption), ``s_pk`` (pairwise masks), the
    commitment ``SHA-256(tag | digest | b)`` to its self-mask seed, and its Ed25519 signature."""

    index: int
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes
    signature: bytes

    def signed_bytes(self, digest: bytes) -> bytes:
        """What the signature covers."""
        return (
            b"fedge-secagg advert v1"
            + digest
            + _U32.pack(self.index)
            + self.c_pk
            + self.s_pk
            + self.b_commit
        )


_ADVERT = struct.Struct("<I32s32s32s64s")
ADVERT_BYTES = _ADVERT.size
#: One share bundle in the clear: sender u32 | recipient u32 | b share | s_sk share.
SHARE_PLAINTEXT_BYTES = 8 + 2 * ELEMENT_BYTES
#: AES-GCM adds a 16-byte tag.
CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + 16
_SEALED = 4 + CIPHERTEXT_BYTES
_RESPONSE_ENTRY = struct.Struct(f"<IB{ELEMENT_BYTES}s")


@dataclass(frozen=True)
class SealedShare:
    """An encrypted share bundle and the other end of it (recipient when sent, sender when
    delivered)."""

    peer: int
    ciphertext: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Which of a device's neighbours uploaded (survivors) and which did not (dropped)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


def _header(cfg: RoundConfig, kind: Kind) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, int(kind), 0, cfg.digest)


def _body(cfg: RoundConfig, data: bytes | bytearray | memoryview, kind: Kind) -> memoryview:
    view = memoryview(data).cast("B")
    if bytes(view[:4]) != MAGIC[: min(4, len(view))]:
        raise WireFormatError("bad_magic", "not a secure-aggregation message")
    if len(view) < HEADER_BYTES:
        raise WireFormatError("truncated", "secure-aggregation header is incomplete")
    _magic, version, got, reserved, digest = _HEADER.unpack_from(view, 0)
    if version != VERSION:
        raise WireFormatError("unsupported_version", f"secure-aggregation version {version}")
    if got != int(kind):
        raise WireFormatError("wrong_kind", f"expected message kind {int(kind)}, got {got}")
    if reserved != 0:
        raise WireFormatError("bad_header", "reserved header field must be 0")
    if digest != cfg.digest:
        raise WireFormatError("bad_header", "the message belongs to another round")
    return view[HEADER_BYTES:]


def _exact(body: memoryview, size: int, what: str) -> None:
    if len(body) < size:
        raise WireFormatError("truncated", f"{what}: {len(body)} of {size} bytes")
    if len(body) > size:
        raise WireFormatError("trailing_bytes", f"{what}: {len(body) - size} bytes too many")


def _index(cfg: RoundConfig, value: int, what: str) -> int:
    if value >= cfg.cohort:
        raise WireFormatError("index_out_of_range", f"{what} {value} is not in the cohort")
    return value


def _count(cfg: RoundConfig, body: memoryview, at: int, entry: int, what: str) -> int:
    """A declared count, checked against the cohort and the bytes that remain."""
    if len(body) < at + 4:
        raise WireFormatError("truncated", f"{what}: count missing")
    (count,) = _U32.unpack_from(body, at)
    if count > cfg.cohort:
        raise WireFormatError("limit_exceeded", f"{what}: {count} entries for {cfg.cohort}")
    if len(body) < at + 4 + count * entry:
        raise WireFormatError("truncated", f"{what}: {count} entries declared")
    return int(count)


def _distinct(values: list[int], what: str) -> None:
    if len(set(values)) != len(values):
        raise WireFormatError("duplicate_index", f"{what}: a device is listed twice")


# -- advertisements -------------------------------------------------------------------------


def _pack_advert(a: Advert) -> bytes:
    return _ADVERT.pack(a.index, a.c_pk, a.s_pk, a.b_commit, a.signature)


def _unpack_advert(cfg: RoundConfig, body: memoryview, at: int) -> Advert:
    index, c_pk, s_pk, commit, sig = _ADVERT.unpack_from(body, at)
    return Advert(_index(cfg, index, "device"), c_pk, s_pk, commit, sig)


def encode_advert(cfg: RoundConfig, advert: Advert) -> bytes:
    return _header(cfg, Kind.ADVERT) + _pack_advert(advert)


def decode_advert(cfg: RoundConfig, data: bytes | bytearray | memoryview) -> Advert:
    body = _body(cfg, data, Kind.ADVERT)
    _exact(body, ADVERT_BYTES, "advert")
    return _unpack_advert(cfg, body, 0)


def encode_advert_list(cfg: RoundConfig, adverts: list[Advert]) -> bytes:
    parts = [_header(cfg, Kind.ADVERT_LIST), _U32.pack(len(adverts))]
    parts += [_pack_advert(a) for a in adverts]
    return b"".join(parts)


def decode_advert_list(cfg: RoundConfig, data: bytes | bytearray | memoryview) -> list[Advert]:
    body = _body(cfg, data, Kind.ADVERT_LIST)
    count = _count(cfg, body, 0, ADVERT_BYTES, "advert list")
    _exact(body, 4 + count * ADVERT_BYTES, "advert list")
    out = [_unpack_advert(cfg, body, 4 + i * ADVERT_BYTES) for i in range(count)]
    _distinct([a.index for a in out], "advert list")
    return out


# -- encrypted shares -----------------------------------------------------------------------


def encode_shares(cfg: RoundConfig, kind: Kind, device: int, sealed: list[SealedShare]) -> bytes:
    """``SHARES_OUT`` (``device`` sends, peers are recipients) or ``SHARES_IN`` (``device``
    receives, peers are senders)."""
    if kind not in (Kind.SHARES_OUT, Kind.SHARES_IN):
        raise ValueError(f"not a share message kind: {kind}")
    parts = [_header(cfg, kind), _U32x2.pack(device, len(sealed))]
    for s in sealed:
        if len(s.ciphertext) != CIPHERTEXT_BYTES:
            raise ValueError("a sealed share has the wrong length")
        parts += [_U32.pack(s.peer), s.ciphertext]
    return b"".join(parts)


def decode_shares(
    cfg: RoundConfig, kind: Kind, data: bytes | bytearray | memoryview
) -> tuple[int, list[SealedShare]]:
    body = _body(cfg, data, kind)
    if len(body) < 4:
        raise WireFormatError("truncated", "share message: device missing")
    device = _index(cfg, _U32.unpack_from(body, 0)[0], "device")
    count = _count(cfg, body, 4, _SEALED, "share message")
    _exact(body, 8 + count * _SEALED, "share message")
    out = []
    for i in range(count):
        at = 8 + i * _SEALED
        peer = _index(cfg, _U32.unpack_from(body, at)[0], "peer")
        out.append(SealedShare(peer, bytes(body[at + 4 : at + _SEALED])))
    _distinct([s.peer for s in out], "share message")
    return device, out


# -- masked input ---------------------------------------------------------------------------


def encode_masked(cfg: RoundConfig, device: int, masked: np.ndarray) -> bytes:
    values = np.ascontiguousarray(masked, dtype="<u4")
    if values.shape != (cfg.k,):
        raise ValueError(f"a masked input has {cfg.k} values, got shape {values.shape}")
    return _header(cfg, Kind.MASKED) + _U32x2.pack(device, cfg.k) + values.tobytes()


def decode_masked(cfg: RoundConfig, data: bytes | bytearray | memoryview) -> tuple[int, np.ndarray]:
    body = _body(cfg, data, Kind.MASKED)
    if len(body) < 8:
        raise WireFormatError("truncated", "masked input: header missing")
    device, k = _U32x2.unpack_from(body, 0)
    _index(cfg, device, "device")
    if k != cfg.k:
        raise WireFormatError("count_mismatch", f"masked input has {k} values, round has {cfg.k}")
    _exact(body, 8 + 4 * k, "masked input")
    values = np.frombuffer(body, dtype="<u4", count=k, offset=8).astype(np.uint32)
    return int(device), values


# -- unmasking ------------------------------------------------------------------------------


def encode_unmask_request(cfg: RoundConfig, request: UnmaskRequest) -> bytes:
    parts = [_header(cfg, Kind.UNMASK_REQUEST)]
    for group in (request.survivors, request.dropped):
        parts += [_U32.pack(len(group)), struct.pack(f"<{len(group)}I", *group)]
    return b"".join(parts)


def decode_unmask_request(cfg: RoundConfig, data: bytes | bytearray | memoryview) -> UnmaskRequest:
    body = _body(cfg, data, Kind.UNMASK_REQUEST)
    groups: list[tuple[int, ...]] = []
    at = 0
    for what in ("survivors", "dropped"):
        count = _count(cfg, body, at, 4, what)
        values = struct.unpack_from(f"<{count}I", body, at + 4)
        groups.append(tuple(_index(cfg, v, what) for v in values))
        at += 4 + 4 * count
    _exact(body, at, "unmask request")
    _distinct([*groups[0], *groups[1]], "unmask request")
    return UnmaskRequest(groups[0], groups[1])


def encode_unmask_response(
    cfg: RoundConfig, device: int, shares: list[tuple[int, ShareKind, bytes]]
) -> bytes:
    """``shares``: ``(owner, kind, share)`` -- the share of ``owner``'s secret that ``device``
    holds."""
    parts = [_header(cfg, Kind.UNMASK_RESPONSE), _U32x2.pack(device, len(shares))]
    parts += [_RESPONSE_ENTRY.pack(owner, int(kind), share) for owner, kind, share in shares]
    return b"".join(parts)


def decode_unmask_response(
    cfg: RoundConfig, data: bytes | bytearray | memoryview
) -> tuple[int, list[tuple[int, ShareKind, bytes]]]:
    body = _body(cfg, data, Kind.UNMASK_RESPONSE)
    if len(body) < 4:
        raise WireFormatError("truncated", "unmask response: device missing")
    device = _index(cfg, _U32.unpack_from(body, 0)[0], "device")
    count = _count(cfg, body, 4, _RESPONSE_ENTRY.size, "unmask response")
    _exact(body, 8 + count * _RESPONSE_ENTRY.size, "unmask response")
    out = []
    for i in range(count):
        owner, kind, share = _RESPONSE_ENTRY.unpack_from(body, 8 + i * _RESPONSE_ENTRY.size)
        if kind not in (ShareKind.SELF_MASK_SEED, ShareKind.MASK_KEY):
            raise WireFormatError("bad_header", f"unknown share kind {kind}")
        out.append((_index(cfg, owner, "owner"), ShareKind(kind), share))
    _distinct([o for o, _, _ in out], "unmask response")
    return device, out
