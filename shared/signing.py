"""Ed25519 request signing shared by the edge agent (signs) and the coordinator (verifies).

The canonical request and the headers are specified in docs/protocol.md. Both sides build the
canonical bytes with :func:`canonical_request`, so they cannot drift apart.

Verification adds the RFC 8032 checks that cryptography (OpenSSL) leaves out: it accepts a
public key of small order, and under the identity point the one signature (R = identity,
S = 0) verifies every message. :func:`public_key_from_b64` refuses non-canonical, off-curve and
small-order keys; :func:`verify_signature` refuses S >= L, a non-canonical or small-order R and
(for keys loaded some other way) a non-canonical or small-order key, before cryptography runs.
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
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCHEME = "FEDGE-SIG-V1"
#: One header carries the whole authentication, about 180 bytes:
#: ``Authorization: Fedge <device id>.<timestamp>.<nonce>.<signature>``.
HEADER_AUTH = "Authorization"
AUTH_SCHEME = "Fedge"

#: 16 random bytes, base64url without padding.
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_-]{86}$")
EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()

#: The field prime, the order of the base point and the curve constant d (RFC 8032 5.1).
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, -1, _P) % _P
_Y_MASK = (1 << 255) - 1
#: y of two of the four points of order 8; the other two have y = p - this.
_Y_ORDER_8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
#: The y values (sign bit cleared) of every 32-byte encoding of the eight points of order 1, 2,
#: 4 and 8: identity (y = 1, or p + 1), order 2 (y = p - 1), order 4 (y = 0, or p) and order 8.
#: Either sign bit decodes to a small-order point (or is invalid), so it is ignored, as in
#: libsodium's blocklist. tests/shared/test_signing_strict.py derives this set from the curve.
SMALL_ORDER_Y = frozenset({0, 1, _P - 1, _Y_ORDER_8, _P - _Y_ORDER_8, _P, _P + 1})


class SignatureError(ValueError):
    """A signed request is malformed or does not verify. ``code`` is the API error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class PublicKeyError(SignatureError):
    """A public key that is malformed, non-canonical, not on the curve or of small order.

    A ValueError, so the enrollment schema answers 422 for it; and a :class:`SignatureError`
    with code ``invalid_signature``, so a device stored with such a key (enrolled before these
    checks) has every request refused: no signature under that key proves anything."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid_signature", detail)


def has_small_order(encoding: bytes) -> bool:
    """Whether a 32-byte point encoding names a point of order 1, 2, 4 or 8, in any of its
    encodings (canonical or not, either sign bit)."""
    return int.from_bytes(encoding, "little") & _Y_MASK in SMALL_ORDER_Y


def _is_canonical(encoding: bytes) -> bool:
    return int.from_bytes(encoding, "little") & _Y_MASK < _P


def _weak_point(encoding: bytes) -> str | None:
    """Why a point encoding is unusable in a signature or a key (cheap checks), or None."""
    if not _is_canonical(encoding):
        return "is not canonically encoded (y >= 2^255 - 19)"
    if has_small_order(encoding):
        return "is a small-order point"
    return None


def _on_curve(encoding: bytes) -> bool:
    """Whether a canonical encoding decodes to a point (RFC 8032 5.1.3): x^2 = (y^2 - 1) /
    (d y^2 + 1) has a root, and x = 0 comes with a clear sign bit."""
    n = int.from_bytes(encoding, "little")
    y = n & _Y_MASK
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    if x2 == 0:
        return n >> 255 == 0
    return pow(x2, (_P - 1) // 2, _P) == 1


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
    """16 random bytes as base64url without padding (22 characters)."""
    return _b64url(secrets.token_bytes(16))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


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
    return auth_header(device_id, ts, nc, key.sign(message))


def auth_header(device_id: str, timestamp: int, nonce: str, signature: bytes) -> dict[str, str]:
    """The authentication header of a signed request, from its parts."""
    value = f"{AUTH_SCHEME} {device_id}.{timestamp}.{nonce}.{_b64url(signature)}"
    return {HEADER_AUTH: value}


@dataclass(frozen=True)
class SignedHeaders:
    device_id: str
    timestamp: int
    nonce: str
    signature: bytes


def parse_signed_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """Check the presence and form of the authentication header (not the signature itself)."""
    lower = {k.lower(): v for k, v in headers.items()}
    value = lower.get(HEADER_AUTH.lower(), "")
    scheme, _, credentials = value.partition(" ")
    if scheme != AUTH_SCHEME or not credentials:
        raise SignatureError(
            "invalid_signature", f"missing {HEADER_AUTH}: {AUTH_SCHEME} <device>.<ts>.<nonce>.<sig>"
        )
    parts = credentials.split(".")
    if len(parts) != 4:
        raise SignatureError("invalid_signature", f"{HEADER_AUTH} must have four parts")
    device_id, ts_text, nonce, signature_text = parts
    if not _DEVICE_RE.match(device_id):
        raise SignatureError("invalid_signature", "malformed device id")
    if not ts_text.isascii() or not ts_text.isdigit() or len(ts_text) > 12:
        raise SignatureError("invalid_signature", "the timestamp must be Unix seconds")
    if not _NONCE_RE.match(nonce):
        raise SignatureError("invalid_signature", "the nonce must be 22 base64url characters")
    if not _SIGNATURE_RE.match(signature_text):
        raise SignatureError(
            "invalid_signature", "an Ed25519 signature is 86 base64url characters (64 bytes)"
        )
    try:
        signature = base64.urlsafe_b64decode(signature_text + "==")
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern admits only valid text
        raise SignatureError("invalid_signature", "the signature is not base64url") from None
    if len(signature) != 64 or _b64url(signature) != signature_text:
        raise SignatureError("invalid_signature", "the signature is not canonical base64url")
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
    verify_signature(public_key, signed.signature, message)


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Ed25519 verification with RFC 8032's strict checks; raises :class:`SignatureError`.

    Refused before cryptography runs: S >= L (a malleated copy of a valid signature), an R that
    is non-canonical or of small order, and a key that is non-canonical or of small order."""
    problem = _weak_point(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    if problem is not None:
        raise SignatureError("invalid_signature", f"the device's public key {problem}")
    if len(signature) != 64:
        raise SignatureError("invalid_signature", "an Ed25519 signature has 64 bytes")
    problem = _weak_point(signature[:32])
    if problem is not None:
        raise SignatureError("invalid_signature", f"the signature's R {problem}")
    if int.from_bytes(signature[32:], "little") >= _L:
        raise SignatureError("invalid_signature", "the signature is not canonical (S >= L)")
    try:
        public_key.verify(signature, message)
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
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Parse a stored or submitted key; raises :class:`PublicKeyError` (a ValueError) for a key
    that is malformed or that RFC 8032's strict checks refuse."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PublicKeyError("public_key must be standard base64") from None
    if len(raw) != 32:
        raise PublicKeyError("public_key must be the raw 32-byte Ed25519 key")
    if not _is_canonical(raw):
        raise PublicKeyError("public_key is not canonically encoded (y >= 2^255 - 19)")
    if has_small_order(raw):
        raise PublicKeyError(
            "public_key is a small-order point (such as the identity); a signature under it "
            "binds nothing"
        )
    if not _on_curve(raw):
        raise PublicKeyError("public_key is not a point on the Ed25519 curve")
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
