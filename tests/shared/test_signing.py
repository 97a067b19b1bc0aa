import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared import signing


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _verify(key, headers, *, method="POST", path="/api/v1/x", query="a=1", body=b"hi"):
    signed = signing.parse_signed_headers(headers)
    signing.verify_request(
        key.public_key(),
        signed,
        method=method,
        path=path,
        query=query,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )
    return signed


def test_signature_round_trip(key):
    headers = signing.sign_request(
        key, device_id="dev1", method="post", path="/api/v1/x", query="a=1", body=b"hi"
    )
    signed = _verify(key, headers)
    assert signed.device_id == "dev1"


def test_query_order_and_encoding_do_not_matter(key):
    headers = signing.sign_request(
        key, device_id="d", method="GET", path="/p", query="b=2&a=x%20y", body=b""
    )
    _verify(key, headers, method="GET", path="/p", query="a=x+y&b=2", body=b"")


@pytest.mark.parametrize(
    "change",
    [
        {"method": "PUT"},
        {"path": "/api/v1/y"},
        {"query": "a=2"},
        {"body": b"hi!"},
    ],
)
def test_any_change_breaks_the_signature(key, change):
    headers = signing.sign_request(
        key, device_id="dev1", method="POST", path="/api/v1/x", query="a=1", body=b"hi"
    )
    with pytest.raises(signing.SignatureError) as err:
        _verify(key, headers, **change)
    assert err.value.code == "invalid_signature"


def test_other_key_fails(key):
    headers = signing.sign_request(key, device_id="d", method="GET", path="/p")
    other = Ed25519PrivateKey.generate()
    with pytest.raises(signing.SignatureError):
        _verify(other, headers, method="GET", path="/p", query="", body=b"")


PARTS = {"device": 0, "timestamp": 1, "nonce": 2, "signature": 3}


@pytest.mark.parametrize(
    ("part", "value"),
    [
        ("nonce", "xyz"),
        ("nonce", "0" * 32),  # the hex nonce of the four-header format
        ("timestamp", "-5"),
        ("timestamp", "\uff11\uff12"),  # full-width digits
        ("signature", "!!!"),
        ("signature", base64.urlsafe_b64encode(b"short").decode().rstrip("=")),
        ("signature", base64.b64encode(bytes(64)).decode()),  # padded standard base64
        ("signature", "A" * 85 + "B"),  # non-zero padding bits: not canonical
        ("device", "a/b"),
    ],
)
def test_malformed_headers_are_rejected(key, part, value):
    headers = signing.sign_request(key, device_id="d", method="GET", path="/p")
    scheme, credentials = headers[signing.HEADER_AUTH].split(" ")
    parts = credentials.split(".")
    parts[PARTS[part]] = value
    headers[signing.HEADER_AUTH] = f"{scheme} {'.'.join(parts)}"
    with pytest.raises(signing.SignatureError) as err:
        signing.parse_signed_headers(headers)
    assert err.value.code == "invalid_signature"


@pytest.mark.parametrize(
    "value", [None, "Bearer abc", "Fedge ", "Fedge a.1.b", "fedge d.1.n.s", "Fedge a.1.b.c.d"]
)
def test_missing_or_malformed_auth_header(key, value):
    headers = signing.sign_request(key, device_id="d", method="GET", path="/p")
    if value is None:
        del headers[signing.HEADER_AUTH]
    else:
        headers[signing.HEADER_AUTH] = value
    with pytest.raises(signing.SignatureError) as err:
        signing.parse_signed_headers(headers)
    assert err.value.code == "invalid_signature"


def test_the_auth_header_is_compact(key):
    headers = signing.sign_request(
        key, device_id="0f8fad5b-d9cb-469f-a165-70867728950e", method="GET", path="/p"
    )
    ((name, value),) = headers.items()
    # name, ": ", value and CRLF: what the four X-Fedge-* headers took 251 bytes for
    assert len(name) + 2 + len(value) + 2 == 180


def test_clock_skew_window():
    signing.check_skew(1000, now=1200, window_s=300)
    with pytest.raises(signing.SignatureError) as err:
        signing.check_skew(1000, now=1301, window_s=300)
    assert err.value.code == "clock_skew"


def test_key_encodings_round_trip(key):
    pub = signing.public_key_from_b64(signing.public_key_to_b64(key.public_key()))
    assert signing.public_key_to_b64(pub) == signing.public_key_to_b64(key.public_key())
    again = signing.private_key_from_pem(signing.private_key_to_pem(key))
    assert signing.public_key_to_b64(again.public_key()) == signing.public_key_to_b64(
        key.public_key()
    )
    with pytest.raises(ValueError):
        signing.public_key_from_b64(base64.b64encode(b"x" * 31).decode())
