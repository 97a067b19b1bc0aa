"""Small-order and malformed Ed25519 keys over the real HTTPS app (issue 10, case 7).

Under the identity point as public key the one signature (R = identity, S = 0) verifies every
request; enrollment must refuse such keys, and a device stored with one (enrolled before the
check) must have every request refused.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
import uuid

import pytest
from sqlalchemy import func, select

from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.models import Device, EnrollmentToken
from fedge.shared import signing
from tests.coordinator.conftest import Coordinator
from tests.support.device import API, SignedDevice, make_token

ME = f"{API}/device/me"
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493


def _encode(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


IDENTITY = _encode(1)
#: Small-order keys in a few encodings: (0, 1) plainly, with the sign bit set and as y = p + 1;
#: (0, -1) of order 2; y = 0, a point of order 4.
WEAK_KEYS = {
    "identity": IDENTITY,
    "identity, sign bit set": _encode(1, 1),
    "identity, y = p + 1": _encode(P + 1),
    "order 2": _encode(P - 1),
    "order 4": _encode(0),
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _sessions(coordinator: Coordinator):
    engine = make_engine(coordinator.settings.database_url)
    return engine, make_sessionmaker(engine)


def _state(coordinator: Coordinator) -> tuple[int, list[int]]:
    """(number of devices, uses of every enrollment token)."""
    engine, sessions = _sessions(coordinator)
    try:
        with session_scope(sessions) as s:
            devices = int(s.scalar(select(func.count()).select_from(Device)) or 0)
            uses = list(s.scalars(select(EnrollmentToken.uses).order_by(EnrollmentToken.id)))
    finally:
        engine.dispose()
    return devices, uses


@pytest.mark.parametrize("key", WEAK_KEYS.values(), ids=WEAK_KEYS.keys())
def test_enrollment_with_a_small_order_key_is_refused_and_changes_nothing(coordinator, key):
    token = make_token(coordinator, max_uses=1)
    with SignedDevice(coordinator.url, coordinator.ca_file) as device:
        r = device.client.post(
            f"{API}/device/enroll",
            json={"token": token, "public_key": _b64(key), "name": "weak"},
        )
        assert r.status_code == 422, r.text
        body = r.json()
        assert set(body) == {"error", "detail"}
        assert body["error"] == "validation_error"
        assert "public_key" in body["detail"]
        assert "small-order" in body["detail"] or "canonical" in body["detail"]
        assert _state(coordinator) == (0, [0])
        # The token was not used: an ordinary key enrolls with it.
        assert device.enroll_request(token).status_code == 201
    assert _state(coordinator) == (1, [1])


def _store_device(coordinator: Coordinator, public_key: str) -> str:
    """A device row as enrollment stored it before the strict key checks existed."""
    device_id = str(uuid.uuid4())
    engine, sessions = _sessions(coordinator)
    try:
        with session_scope(sessions) as s:
            s.add(
                Device(
                    id=device_id,
                    name="legacy",
                    public_key=public_key,
                    status="active",
                    capabilities={},
                    enrolled_at=utcnow(),
                )
            )
    finally:
        engine.dispose()
    return device_id


def _forged_headers(key: bytes, *, device_id: str, method: str, path: str, body: bytes):
    """Headers with the signature (R = identity, S = 0), a nonce chosen so that a cofactorless
    verifier accepts it under the small-order key (the challenge k is a multiple of 8)."""
    timestamp = int(time.time())
    r = IDENTITY
    for i in itertools.count():
        nonce = f"{i:022x}"
        message = signing.canonical_request(
            method=method,
            path=path,
            query="",
            device_id=device_id,
            timestamp=timestamp,
            nonce=nonce,
            body_sha256=hashlib.sha256(body).hexdigest(),
        )
        k = int.from_bytes(hashlib.sha512(r + key + message).digest(), "little") % L
        if k % 8 == 0:
            return signing.auth_header(device_id, timestamp, nonce, r + bytes(32))
    raise AssertionError("unreachable")


@pytest.mark.parametrize("key", WEAK_KEYS.values(), ids=WEAK_KEYS.keys())
def test_a_stored_small_order_key_gets_401_for_every_request(coordinator, key):
    device_id = _store_device(coordinator, _b64(key))
    requests = [
        ("GET", ME, b""),
        ("GET", f"{API}/device/work", b""),
        ("POST", f"{API}/device/assignments/1/update", b"not an update"),
    ]
    with SignedDevice(coordinator.url, coordinator.ca_file, device_id=device_id) as device:
        for method, path, body in requests:
            headers = _forged_headers(key, device_id=device_id, method=method, path=path, body=body)
            r = device.request(method, path, content=body, headers=headers, sign=False)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json() == {"error": "invalid_signature", "detail": r.json()["detail"]}
        # An ordinary signature by some other key is refused the same way.
        r = device.get(ME)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "invalid_signature"


@pytest.mark.parametrize(
    "stored",
    [_b64(b"x" * 31), _b64(_encode(P + 2)), "not base64!"],
    ids=["31 bytes", "y >= p", "not base64"],
)
def test_a_stored_malformed_key_gets_401_not_500(coordinator, stored):
    device_id = _store_device(coordinator, stored)
    with SignedDevice(coordinator.url, coordinator.ca_file, device_id=device_id) as device:
        r = device.get(ME)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "invalid_signature"
