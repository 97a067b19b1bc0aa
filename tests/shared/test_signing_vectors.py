"""Fixed test vectors for the signed request format (docs/protocol.md) and tampering tests.

The key is RFC 8032's test 1 secret; Ed25519 signatures are deterministic, so the canonical
bytes and the signature below are the format itself: a change to the canonical string (the
order or case of a line, the separator, blank query values, the query's encoding) breaks them.
Every signed part of a request is then altered in turn, in the header the device sent and in
what the coordinator sees, and each alteration must be refused.
"""

from __future__ import annotations

import base64
import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared import signing

RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUBLIC_B64 = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
NONCE = "AAAAAAAAAAAAAAAAAAAAAA"
BODY = b'{"x":1}'
BODY_SHA256 = "5041bf1f713df204784353e82f6a4a535931cb64f1f4b4a5aeaffcb720918b22"
REQUEST = {
    "device_id": "dev-1",
    "method": "post",
    "path": "/api/v1/devices/dev-1/updates",
    "query": "b=2&a=x%20y&empty=&a=1",
    "timestamp": 1_700_000_000,
}
CANONICAL = (
    b"FEDGE-SIG-V1\n"
    b"POST\n"
    b"/api/v1/devices/dev-1/updates\n"
    b"a=1&a=x%20y&b=2&empty=\n"
    b"dev-1\n"
    b"1700000000\n"
    b"AAAAAAAAAAAAAAAAAAAAAA\n"
    b"5041bf1f713df204784353e82f6a4a535931cb64f1f4b4a5aeaffcb720918b22"
)
SIGNATURE = "ugb9Iu2_WnIGU8RNQwdXOv3IvatUOJcg9NW-eT1WU0MsjjnDWvMGz_qOsdF-2_RX_C_qfTiEguszukqQtJqFDA"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)


def test_key_and_body_hash_of_the_vector(key: Ed25519PrivateKey) -> None:
    assert signing.public_key_to_b64(key.public_key()) == PUBLIC_B64
    assert hashlib.sha256(BODY).hexdigest() == BODY_SHA256


def test_canonical_request_vector() -> None:
    got = signing.canonical_request(
        method=REQUEST["method"],
        path=REQUEST["path"],
        query=REQUEST["query"],
        device_id=REQUEST["device_id"],
        timestamp=REQUEST["timestamp"],
        nonce=NONCE,
        body_sha256=BODY_SHA256,
    )
    assert got == CANONICAL


def test_signed_header_vector(key: Ed25519PrivateKey) -> None:
    headers = signing.sign_request(key, nonce=NONCE, body=BODY, **REQUEST)  # type: ignore[arg-type]
    assert headers == {
        "Authorization": f"Fedge dev-1.1700000000.{NONCE}.{SIGNATURE}",
    }
    # The signature is that of the canonical bytes under the key (checked with cryptography
    # directly, not through the module).
    raw = base64.urlsafe_b64decode(SIGNATURE + "==")
    assert raw == key.sign(CANONICAL)
    key.public_key().verify(raw, CANONICAL)


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        ("", ""),
        ("a=", "a="),
        ("a", "a="),  # a key without '=' is a blank value
        ("a=&a=", "a=&a="),
        ("z=1&a=2", "a=2&z=1"),
        ("a=2&a=1", "a=1&a=2"),  # equal keys sort by value
        ("a=x+y", "a=x%20y"),
        ("a=x%20y", "a=x%20y"),
        ("k%2Fx=%7E-_.", "k%2Fx=~-_."),  # unreserved characters stay, '/' is encoded
        ("a=%C3%A9", "a=%C3%A9"),
        ("a=%c3%a9", "a=%C3%A9"),  # upper-case hex
        ("a=1&&b=2", "a=1&b=2"),  # empty fields are dropped
        ("a=1;b=2", "a=1%3Bb%3D2"),  # ';' is not a separator
        ("a=b=c", "a=b%3Dc"),
    ],
)
def test_canonical_query_edge_cases(query: str, canonical: str) -> None:
    assert signing.canonical_query(query) == canonical


@pytest.mark.parametrize("method", ["get", "Get", "GET"])
def test_method_is_upper_cased(method: str) -> None:
    lines = signing.canonical_request(
        method=method, path="/p", query="", device_id="d", timestamp=1, nonce=NONCE, body_sha256=""
    ).split(b"\n")
    assert lines == [b"FEDGE-SIG-V1", b"GET", b"/p", b"", b"d", b"1", NONCE.encode(), b""]


def test_empty_body_hash_constant() -> None:
    assert hashlib.sha256(b"").hexdigest() == signing.EMPTY_BODY_SHA256


def _verify(
    key: Ed25519PrivateKey,
    header: str,
    *,
    method: str = "POST",
    path: str = REQUEST["path"],  # type: ignore[assignment]
    query: str = REQUEST["query"],  # type: ignore[assignment]
    body: bytes = BODY,
) -> signing.SignedHeaders:
    signed = signing.parse_signed_headers({"authorization": header})
    signing.verify_request(
        key.public_key(),
        signed,
        method=method,
        path=path,
        query=query,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )
    return signed


def test_the_vector_verifies(key: Ed25519PrivateKey) -> None:
    signed = _verify(key, f"Fedge dev-1.1700000000.{NONCE}.{SIGNATURE}")
    assert signed == signing.SignedHeaders(
        "dev-1", 1_700_000_000, NONCE, base64.urlsafe_b64decode(SIGNATURE + "==")
    )
    # Equivalent spellings of the same request verify too.
    _verify(key, f"Fedge dev-1.1700000000.{NONCE}.{SIGNATURE}", method="post")
    _verify(key, f"Fedge dev-1.1700000000.{NONCE}.{SIGNATURE}", query="a=1&empty&b=2&a=x+y")


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, "dev-2"),  # device id
        (1, "1700000001"),  # timestamp
        (2, "AAAAAAAAAAAAAAAAAAAAAB"),  # nonce
    ],
)
def test_altered_signed_header_part_is_refused(
    key: Ed25519PrivateKey, index: int, value: str
) -> None:
    parts = ["dev-1", "1700000000", NONCE, SIGNATURE]
    parts[index] = value
    header = "Fedge " + ".".join(parts)
    signed = signing.parse_signed_headers({"Authorization": header})  # well formed
    assert getattr(signed, ["device_id", "timestamp", "nonce"][index]) == (
        int(value) if index == 1 else value
    )
    with pytest.raises(signing.SignatureError) as err:
        _verify(key, header)
    assert err.value.code == "invalid_signature"


@pytest.mark.parametrize(
    "change",
    [
        {"method": "GET"},
        {"path": "/api/v1/devices/dev-1/update"},
        {"query": "b=2&a=x%20y&a=1"},  # the blank value dropped
        {"query": "b=2&a=x%20y&empty=0&a=1"},
        {"query": ""},
        {"body": b""},
        {"body": BODY + b" "},
    ],
)
def test_altered_request_is_refused(key: Ed25519PrivateKey, change: dict[str, object]) -> None:
    with pytest.raises(signing.SignatureError) as err:
        _verify(key, f"Fedge dev-1.1700000000.{NONCE}.{SIGNATURE}", **change)  # type: ignore[arg-type]
    assert err.value.code == "invalid_signature"


def test_altered_signature_is_refused(key: Ed25519PrivateKey) -> None:
    raw = bytearray(base64.urlsafe_b64decode(SIGNATURE + "=="))
    raw[40] ^= 1  # in S, still below L
    text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(signing.SignatureError) as err:
        _verify(key, f"Fedge dev-1.1700000000.{NONCE}.{text}")
    assert (err.value.code, err.value.detail) == (
        "invalid_signature",
        "the signature does not verify",
    )
    # S + L: the same signature, malleated, refused before the curve arithmetic.
    raw = base64.urlsafe_b64decode(SIGNATURE + "==")
    s = int.from_bytes(raw[32:], "little") + 2**252 + 27742317777372353535851937790883648493
    with pytest.raises(signing.SignatureError) as err:
        signing.verify_signature(key.public_key(), raw[:32] + s.to_bytes(32, "little"), CANONICAL)
    assert (err.value.code, err.value.detail) == (
        "invalid_signature",
        "the signature is not canonical (S >= L)",
    )


@pytest.mark.parametrize(
    ("now", "window", "ok"),
    [
        (1000, 300, True),
        (1300, 300, True),
        (700, 300, True),
        (1300.5, 300, False),
        (699, 300, False),
        (1010, 10, True),
        (1011, 10, False),
        (989, 10, False),
    ],
)
def test_skew_window_both_directions(now: float, window: int, ok: bool) -> None:
    if ok:
        signing.check_skew(1000, now=now, window_s=window)
    else:
        with pytest.raises(signing.SignatureError) as err:
            signing.check_skew(1000, now=now, window_s=window)
        assert err.value.code == "clock_skew"
        assert f"(allowed: {window} s)" in err.value.detail


def test_defaults_sign_an_empty_query_and_body(key: Ed25519PrivateKey) -> None:
    headers = signing.sign_request(
        key, device_id="dev-1", method="GET", path="/p", timestamp=1, nonce=NONCE
    )
    canonical = b"\n".join(
        [b"FEDGE-SIG-V1", b"GET", b"/p", b"", b"dev-1", b"1", NONCE.encode(), EMPTY_SHA256]
    )
    signature = base64.urlsafe_b64encode(key.sign(canonical)).rstrip(b"=").decode()
    assert headers == {"Authorization": f"Fedge dev-1.1.{NONCE}.{signature}"}


EMPTY_SHA256 = b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (None, "missing Authorization: Fedge <device>.<ts>.<nonce>.<sig>"),
        ("Bearer abc", "missing Authorization: Fedge <device>.<ts>.<nonce>.<sig>"),
        ("Fedge ", "missing Authorization: Fedge <device>.<ts>.<nonce>.<sig>"),
        ("Fedge a.1.b", "Authorization must have four parts"),
        (f"Fedge Fedge d.1.{NONCE}.{SIGNATURE}", "malformed device id"),
        (f"Fedge {'d' * 65}.1.{NONCE}.{SIGNATURE}", "malformed device id"),
        (f"Fedge d.-5.{NONCE}.{SIGNATURE}", "the timestamp must be Unix seconds"),
        (f"Fedge d.{'1' * 13}.{NONCE}.{SIGNATURE}", "the timestamp must be Unix seconds"),
        (f"Fedge d.1.{NONCE[:-1]}.{SIGNATURE}", "the nonce must be 22 base64url characters"),
        (
            f"Fedge d.1.{NONCE}.{SIGNATURE[:-1]}",
            "an Ed25519 signature is 86 base64url characters (64 bytes)",
        ),
        (f"Fedge d.1.{NONCE}.{'A' * 85}B", "the signature is not canonical base64url"),
    ],
)
def test_malformed_header_details(value: str | None, detail: str) -> None:
    headers = {} if value is None else {"Authorization": value}
    with pytest.raises(signing.SignatureError) as err:
        signing.parse_signed_headers(headers)
    assert (err.value.code, err.value.detail, str(err.value)) == (
        "invalid_signature",
        detail,
        detail,
    )


def test_largest_accepted_header_fields() -> None:
    """64-character device ids and 12-digit timestamps are the limits."""
    device = "d" * 64
    signed = signing.parse_signed_headers(
        {"AUTHORIZATION": f"Fedge {device}.{'9' * 12}.{NONCE}.{SIGNATURE}"}
    )
    assert (signed.device_id, signed.timestamp) == (device, 999_999_999_999)


def test_skew_defaults_to_300_s_and_the_current_time() -> None:
    signing.check_skew(1000, now=1300)
    with pytest.raises(signing.SignatureError) as err:
        signing.check_skew(1000, now=1301)
    assert err.value.detail == (
        "request time is 301 s off the coordinator's clock (allowed: 300 s); "
        "check the device's clock"
    )
    signing.check_skew(int(time.time()))
    with pytest.raises(signing.SignatureError) as err:
        signing.check_skew(int(time.time()) + 1000)
    assert err.value.code == "clock_skew"
    # int() of the (now - timestamp) difference: about -999 s, whatever the fraction of a second.
    head, _, _ = err.value.detail.partition(" s off the coordinator's clock")
    assert head.startswith("request time is ")
    assert -1000 <= int(head.removeprefix("request time is ")) <= -998


def test_canonical_query_encodes_slashes_in_values() -> None:
    assert signing.canonical_query("p=a/b&q=~x") == "p=a%2Fb&q=~x"


def test_signature_of_the_wrong_length_is_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(signing.SignatureError) as err:
        signing.verify_signature(key.public_key(), bytes(63), CANONICAL)
    assert (err.value.code, err.value.detail) == (
        "invalid_signature",
        "an Ed25519 signature has 64 bytes",
    )


Y1_ENC = (1).to_bytes(32, "little")


def test_on_curve_for_the_points_with_x_zero() -> None:
    """y = 1 (the identity) and y = p - 1 have x = 0: on the curve with a clear sign bit only."""
    p = 2**255 - 19
    assert signing._on_curve(Y1_ENC)
    assert not signing._on_curve((1 | 1 << 255).to_bytes(32, "little"))
    assert signing._on_curve((p - 1).to_bytes(32, "little"))
    assert not signing._on_curve((p - 1 | 1 << 255).to_bytes(32, "little"))


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("not base64!", "public_key must be standard base64"),
        (PUBLIC_B64[:20] + "*" + PUBLIC_B64[20:], "public_key must be standard base64"),
        (base64.b64encode(bytes(31)).decode(), "public_key must be the raw 32-byte Ed25519 key"),
        (
            base64.b64encode((2**255 - 19).to_bytes(32, "little")).decode(),
            "public_key is not canonically encoded (y >= 2^255 - 19)",
        ),
        (
            base64.b64encode(Y1_ENC).decode(),
            "public_key is a small-order point (such as the identity); a signature under it "
            "binds nothing",
        ),
        (
            base64.b64encode((2).to_bytes(32, "little")).decode(),
            "public_key is not a point on the Ed25519 curve",
        ),
    ],
)
def test_public_key_errors(text: str, detail: str) -> None:
    with pytest.raises(signing.PublicKeyError) as err:
        signing.public_key_from_b64(text)
    assert (err.value.code, str(err.value)) == ("invalid_signature", detail)


def test_a_pem_of_another_key_type_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    pem = Ed448PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    with pytest.raises(ValueError) as err:
        signing.private_key_from_pem(pem)
    assert str(err.value) == "the identity key is not an Ed25519 key"
