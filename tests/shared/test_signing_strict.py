"""RFC 8032 strict checks around cryptography's Ed25519 verify (issue 10, case 7).

cryptography (OpenSSL) accepts a small-order public key; under the identity point the one
signature (R = identity, S = 0) verifies every message. The small-order encodings are derived
here from curve arithmetic (a tiny affine Edwards implementation), not copied from a list.
"""

from __future__ import annotations

import base64
import hashlib
import itertools

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedge.shared import signing

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, -1, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Y_MASK = (1 << 255) - 1
IDENTITY = (0, 1)

Point = tuple[int, int]


def add(a: Point, b: Point) -> Point:
    """Affine Edwards addition (complete on edwards25519: d is not a square)."""
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P
    return x3, y3


def mul(point: Point, k: int) -> Point:
    result, addend = IDENTITY, point
    while k:
        if k & 1:
            result = add(result, addend)
        addend = add(addend, addend)
        k >>= 1
    return result


def decode(encoding: bytes) -> Point | None:
    """Lenient decoding as ref10 and OpenSSL do it: y is taken modulo p and a zero x keeps
    x = 0 whatever the sign bit says. None when no point has this y."""
    n = int.from_bytes(encoding, "little")
    y, sign = (n & Y_MASK) % P, n >> 255
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if x * x % P != x2:
        x = x * SQRT_M1 % P
    if x * x % P != x2:
        return None
    if x & 1 != sign:
        x = -x % P
    return x, y


def encode(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


def torsion_points() -> list[Point]:
    """The eight points of order dividing 8: the multiples of an order-8 point, found as
    [L]Q for points Q decoded from hash outputs (the group is Z/8 x Z/L)."""
    for counter in itertools.count():
        q = decode(hashlib.sha256(counter.to_bytes(8, "little")).digest())
        if q is None:
            continue
        t = mul(q, L)
        if mul(t, 4) != IDENTITY:
            return [mul(t, i) for i in range(8)]
    raise AssertionError("unreachable")


def encodings_of(point: Point) -> list[bytes]:
    """Every 32-byte string that decodes (leniently) to ``point``."""
    _, y = point
    return [
        encode(yy, sign)
        for yy in (y, y + P)
        if yy <= Y_MASK
        for sign in (0, 1)
        if decode(encode(yy, sign)) == point
    ]


TORSION = torsion_points()
SMALL_ORDER_ENCODINGS = sorted({e for t in TORSION for e in encodings_of(t)})
BASE = decode(encode(4 * pow(5, -1, P) % P))
ORDER_2 = (0, P - 1)


def order(point: Point) -> int:
    return next(n for n in (1, 2, 4, 8) if mul(point, n) == IDENTITY)


def challenge(r: bytes, a: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + a + message).digest(), "little") % L


def forge(a: bytes, prefix: bytes = b"forged") -> tuple[bytes, bytes]:
    """A message and the signature (R = identity, S = 0) that a cofactorless verifier accepts
    under the small-order key ``a``: it needs [k]A = identity, i.e. ord(A) divides k."""
    point = decode(a)
    assert point is not None and mul(point, 8) == IDENTITY
    r = encode(1)
    for i in itertools.count():
        message = prefix + str(i).encode()
        if mul(point, challenge(r, a, message) % 8) == IDENTITY:
            return message, r + bytes(32)
    raise AssertionError("unreachable")


def raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _short(encoding: bytes) -> str:
    return encoding.hex()[:8] + encoding.hex()[-2:]


# -- the arithmetic itself ------------------------------------------------------------------


def test_the_test_arithmetic_is_edwards25519():
    assert BASE is not None
    assert mul(BASE, L) == IDENTITY
    assert mul(BASE, L - 1) == (-BASE[0] % P, BASE[1])
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert decode(raw(key.public_key())) is not None


def test_the_torsion_subgroup_is_eight_points_of_orders_1_2_4_8():
    assert len(set(TORSION)) == 8
    assert sorted(order(t) for t in TORSION) == [1, 2, 4, 4, 8, 8, 8, 8]
    assert IDENTITY in TORSION and ORDER_2 in TORSION
    # identity x2 + p+1 x2; order 2 x2; order 4: y = 0 and y = p, x2 each; order 8 x4
    assert len(SMALL_ORDER_ENCODINGS) == 14


# -- the blocklist ----------------------------------------------------------------------------


def test_the_blocklist_is_exactly_the_small_order_y_values():
    derived = {int.from_bytes(e, "little") & Y_MASK for e in SMALL_ORDER_ENCODINGS}
    assert set(signing.SMALL_ORDER_Y) == derived
    for y in signing.SMALL_ORDER_Y:
        for sign in (0, 1):
            point = decode(encode(y, sign))
            assert point is not None, (y, sign)
            assert mul(point, 8) == IDENTITY, (y, sign)


@pytest.mark.parametrize("encoding", SMALL_ORDER_ENCODINGS, ids=_short)
def test_every_small_order_encoding_is_refused(encoding):
    assert signing.has_small_order(encoding)
    with pytest.raises(ValueError, match=r"small-order|canonical"):
        signing.public_key_from_b64(b64(encoding))
    # A key already loaded (a row enrolled before the check): the forgery does not verify.
    message, forged = forge(encoding)
    with pytest.raises(signing.SignatureError) as err:
        signing.verify_signature(Ed25519PublicKey.from_public_bytes(encoding), forged, message)
    assert err.value.code == "invalid_signature"
    assert "public key" in err.value.detail


def _near(encoding: bytes, delta: int) -> bytes:
    n = int.from_bytes(encoding, "little")
    return ((n & ~Y_MASK) | ((n & Y_MASK) + delta) % (Y_MASK + 1)).to_bytes(32, "little")


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(min_size=32, max_size=32),
        st.sampled_from(SMALL_ORDER_ENCODINGS),
        st.builds(_near, st.sampled_from(SMALL_ORDER_ENCODINGS), st.integers(-3, 3).filter(bool)),
    )
)
def test_has_small_order_iff_eight_times_the_point_is_the_identity(encoding):
    point = decode(encoding)
    assert signing.has_small_order(encoding) == (point is not None and mul(point, 8) == IDENTITY)


# -- public keys ------------------------------------------------------------------------------


def test_identity_key_is_refused_with_a_clear_error():
    with pytest.raises(signing.PublicKeyError, match="small-order") as err:
        signing.public_key_from_b64(b64(encode(1)))
    # A ValueError for the enrollment schema, a SignatureError for request verification.
    assert isinstance(err.value, ValueError)
    assert isinstance(err.value, signing.SignatureError)
    assert err.value.code == "invalid_signature"


def test_identity_key_forgery_is_refused_by_verify_request():
    headers = signing.auth_header("dev1", 1700000000, "A" * 22, encode(1) + bytes(32))
    signed = signing.parse_signed_headers(headers)
    with pytest.raises(signing.SignatureError) as err:
        signing.verify_request(
            Ed25519PublicKey.from_public_bytes(encode(1)),
            signed,
            method="POST",
            path="/api/v1/device/assignments/1/update",
            query="",
            body_sha256=hashlib.sha256(b"any update at all").hexdigest(),
        )
    assert err.value.code == "invalid_signature"
    assert "small-order" in err.value.detail


def _valid_point_with_small_y() -> int:
    """A y < 19 of a point that is on the curve and not of small order, so y + p is a
    non-canonical encoding of an ordinary point."""
    for y in range(19):
        point = decode(encode(y))
        if point is not None and mul(point, 8) != IDENTITY:
            return y
    raise AssertionError("no such y")


def test_non_canonical_encoding_of_an_ordinary_point_is_refused():
    y = _valid_point_with_small_y()
    alias = encode(y + P)
    assert decode(alias) == decode(encode(y))
    with pytest.raises(signing.PublicKeyError, match="canonical"):
        signing.public_key_from_b64(b64(alias))
    key = Ed25519PublicKey.from_public_bytes(alias)
    with pytest.raises(signing.SignatureError, match="canonical"):
        signing.verify_signature(key, bytes(64), b"m")


@given(y=st.integers(P, Y_MASK), sign=st.integers(0, 1))
def test_every_y_of_p_or_more_is_refused(y, sign):
    with pytest.raises(signing.PublicKeyError, match="canonical"):
        signing.public_key_from_b64(b64(encode(y, sign)))


def test_off_curve_key_is_refused():
    y = next(y for y in itertools.count(2) if decode(encode(y)) is None)
    with pytest.raises(signing.PublicKeyError, match="not a point"):
        signing.public_key_from_b64(b64(encode(y)))


@pytest.mark.parametrize("text", ["not base64!", b64(b"x" * 31), b64(b"x" * 33), ""])
def test_malformed_key_text_is_a_public_key_error(text):
    with pytest.raises(signing.PublicKeyError):
        signing.public_key_from_b64(text)


@settings(max_examples=50)
@given(seed=st.binary(min_size=32, max_size=32), message=st.binary(max_size=200))
def test_ordinary_keys_and_signatures_are_accepted(seed, message):
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = signing.public_key_from_b64(b64(raw(key.public_key())))
    assert not signing.has_small_order(raw(public))
    signing.verify_signature(public, key.sign(message), message)


# -- signatures -------------------------------------------------------------------------------

# RFC 8032 section 7.1, tests 1-3: (secret key, public key, message, signature).
RFC8032_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032_VECTORS)
def test_rfc8032_vectors_still_verify(secret, public, message, signature):
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert raw(key.public_key()).hex() == public
    assert key.sign(bytes.fromhex(message)).hex() == signature
    loaded = signing.public_key_from_b64(b64(bytes.fromhex(public)))
    signing.verify_signature(loaded, bytes.fromhex(signature), bytes.fromhex(message))


VECTOR_KEY = signing.public_key_from_b64(b64(bytes.fromhex(RFC8032_VECTORS[0][1])))
VECTOR_SIG = bytes.fromhex(RFC8032_VECTORS[0][3])


@given(s=st.integers(L, 2**256 - 1))
@example(s=L)
@example(s=int.from_bytes(VECTOR_SIG[32:], "little") + L)
def test_s_of_l_or_more_is_refused(s):
    with pytest.raises(signing.SignatureError, match="canonical") as err:
        signing.verify_signature(VECTOR_KEY, VECTOR_SIG[:32] + s.to_bytes(32, "little"), b"")
    assert err.value.code == "invalid_signature"


@settings(max_examples=50)
@given(message=st.binary(max_size=200))
def test_s_plus_l_variant_of_a_valid_signature_is_refused(message):
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"s plus l").digest())
    signature = key.sign(message)
    s = int.from_bytes(signature[32:], "little")
    signing.verify_signature(key.public_key(), signature, message)
    malleated = signature[:32] + (s + L).to_bytes(32, "little")
    with pytest.raises(signing.SignatureError, match="canonical"):
        signing.verify_signature(key.public_key(), malleated, message)


@pytest.mark.parametrize("r", SMALL_ORDER_ENCODINGS, ids=_short)
def test_small_order_r_is_refused(r):
    with pytest.raises(signing.SignatureError, match="R is") as err:
        signing.verify_signature(VECTOR_KEY, r + VECTOR_SIG[32:], b"")
    assert err.value.code == "invalid_signature"


def test_a_wrong_signature_is_still_refused():
    bad = VECTOR_SIG[:32] + bytes(32)
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_signature(VECTOR_KEY, bad, b"")
