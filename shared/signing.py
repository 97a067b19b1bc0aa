"""Ed25519 request signing shared by the edge agent (signs) and the coordinator (verifies).

The canonical request and the headers are specified in docs/protocol.md. Both sides build the
canonical bytes with :func:`canonical_request`, so they cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEME = "FEDGE-SIG-V1"
HEADER_DEVICE = "X-Fedge-Device"
HEADER_TIMESTAMP = "X-Fedge-Timestamp"
HEADER_NONCE = "X-Fedge-Nonce"
HEADER_SIGNATURE = "X-Fedge-Signature"
SIGNED_HEADERS = (HEADER_DEVICE, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()


class SignatureError(ValueError):
    """A signed request is malformed or does not verify. ``code`` is the API error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def canonical_query(query: str) -> str:
    """Sorted, uniformly percent-encoded form of a raw query string."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(pairs))


def canonical_request(
    *,
    method: str,
    path: str,
    query: str,
    device_id: str,
    timestamp: int,
    nonce: str,
    body_sha256: str,
) -> bytes:
    lines = [
        SCHEME,
        method.upper(),
        path,
        canonical_query(query),
        device_id,
        str(timestamp),
        nonce,
        body_sha256,
    ]
    return "\n".join(lines).encode("utf-8")


def new_nonce() -> str:
    return secrets.token_hex(16)


def sign_request(
    key: Ed25519PrivateKey,
    *,
    device_id: str,
    method: str,
    path: str,
    query: str = "",
    body: bytes = b"",
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request as ``device_id``."""
    ts = int(time.time()) if timestamp is None else timestamp
    nc = new_nonce() if nonce is None else nonce
    message = canonical_request(
        method=method,
        path=path,
        query=query,
        device_id=device_id,
        timestamp=ts,
        nonce=nc,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )
    signature = base64.b64encode(key.sign(message)).decode("ascii")
    return {
        HEADER_DEVICE: device_id,
        HEADER_TIMESTAMP: str(ts),
        HEADER_NONCE: nc,
        HEADER_SIGNATURE: signature,
    }


@dataclass(frozen=True)
class SignedHeaders:
    device_id: str
    timestamp: int
    nonce: str
    signature: bytes


def parse_signed_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """Check the presence and form of the four signing headers (not the signature itself)."""
    lower = {k.lower(): v for k, v in headers.items()}
    values = {}
    for name in SIGNED_HEADERS:
        value = lower.get(name.lower())
        if not value:
            raise SignatureError("invalid_signature", f"missing header {name}")
        values[name] = value
    device_id = values[HEADER_DEVICE]
    if not _DEVICE_RE.match(device_id):
        raise SignatureError("invalid_signature", f"malformed {HEADER_DEVICE}")
    ts_text = values[HEADER_TIMESTAMP]
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
        raise SignatureError("invalid_signature", f"{HEADER_TIMESTAMP} must be Unix seconds")
    nonce = values[HEADER_NONCE]
    if not _NONCE_RE.match(nonce):
        raise SignatureError("invalid_signature", f"{HEADER_NONCE} must be 32 lowercase hex")
    try:
        signature = base64.b64decode(values[HEADER_SIGNATURE], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("invalid_signature", f"{HEADER_SIGNATURE} is not base64") from None
    if len(signature) != 64:
        raise SignatureError("invalid_signature", "an Ed25519 signature has 64 bytes")
    return SignedHeaders(device_id, int(ts_text), nonce, signature)


def verify_request(
    public_key: Ed25519PublicKey,
    signed: SignedHeaders,
    *,
    method: str,
    path: str,
    query: str,
    body_sha256: str,
) -> None:
    """Raise :class:`SignatureError` unless the signature covers this request."""
    message = canonical_request(
        method=method,
        path=path,
        query=query,
        device_id=signed.device_id,
        timestamp=signed.timestamp,
        nonce=signed.nonce,
        body_sha256=body_sha256,
    )
    try:
        public_key.verify(signed.signature, message)
    except InvalidSignature:
        raise SignatureError("invalid_signature", "the signature does not verify") from None


def check_skew(timestamp: int, *, now: float | None = None, window_s: int = 300) -> None:
    current = time.time() if now is None else now
    if abs(current - timestamp) > window_s:
        raise SignatureError(
            "clock_skew",
            f"request time is {int(current - timestamp)} s off the coordinator's clock "
            f"(allowed: {window_s} s); check the device's clock",
        )


def public_key_to_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("public_key must be standard base64") from None
    if len(raw) != 32:
        raise ValueError("public_key must be the raw 32-byte Ed25519 key")
    return Ed25519PublicKey.from_public_bytes(raw)


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the identity key is not an Ed25519 key")
    return key
