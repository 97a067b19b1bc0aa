"""Device identity: enrollment and the verification of every signed request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update

from fedge.coordinator.api.bodylimit import MAX_JSON_BODY
from fedge.coordinator.app import create_app
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.models import Device, EnrollmentToken, UsedNonce
from fedge.shared import signing
from tests.coordinator.conftest import Coordinator, make_key
from tests.support.device import API, SignedDevice, make_token
from tests.support.rounds import (
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)
from tests.support.servers import serve_in_thread

ME = f"{API}/device/me"


def _count(settings, model) -> int:
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        engine.dispose()


def test_enroll_then_me(coordinator):
    with SignedDevice.enroll(coordinator, name="pi-1", capabilities={"cpu": 4}) as device:
        r = device.get(ME)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["device_id"] == device.device_id
        assert body["name"] == "pi-1"
        assert body["capabilities"] == {"cpu": 4}
        assert body["status"] == "active"
        assert body["public_key"] == device.public_key_b64
        assert body["last_seen_at"] is not None


def test_one_use_token_enrolls_exactly_one_of_concurrent_devices(coordinator):
    token = make_token(coordinator, max_uses=1)
    devices = [SignedDevice(coordinator.url, coordinator.ca_file) for _ in range(6)]
    try:
        with ThreadPoolExecutor(len(devices)) as pool:
            responses = list(pool.map(lambda d: d.enroll_request(token), devices))
    finally:
        for d in devices:
            d.close()
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [401] * 5, [r.text for r in responses]
    assert {r.json()["error"] for r in responses if r.status_code == 401} == {"invalid_token"}
    assert _count(coordinator.settings, Device) == 1


def test_token_is_used_up_after_max_uses(coordinator):
    enrolled = 0
    for max_uses in (1, 3):
        token = make_token(coordinator, max_uses=max_uses)
        for _ in range(max_uses):
            SignedDevice.enroll(coordinator, token=token).close()
        enrolled += max_uses
        with SignedDevice(coordinator.url, coordinator.ca_file) as extra:
            r = extra.enroll_request(token)
        assert r.status_code == 401, max_uses
        assert r.json()["error"] == "invalid_token"
        assert _count(coordinator.settings, Device) == enrolled


def test_unknown_expired_and_revoked_tokens_are_refused(coordinator):
    expired = make_token(coordinator, expires_in_s=1)
    revoked = make_token(coordinator)
    with coordinator.admin() as admin:
        tokens = admin.get(f"{API}/enrollment-tokens").json()["items"]
        newest = max(t["id"] for t in tokens)
        assert admin.post(f"{API}/enrollment-tokens/{newest}/revoke").status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # wait for the 1-second token to expire
        with coordinator.admin() as admin:
            statuses = {t["status"] for t in admin.get(f"{API}/enrollment-tokens").json()["items"]}
        if "expired" in statuses:
            break
        time.sleep(0.1)
    for token in (expired, revoked, "fe_not-a-token"):
        with SignedDevice(coordinator.url, coordinator.ca_file) as device:
            r = device.enroll_request(token)
        assert r.status_code == 401, token
        assert r.json() == {"error": "invalid_token", "detail": r.json()["detail"]}
    assert _count(coordinator.settings, Device) == 0


def test_same_key_cannot_enroll_twice(coordinator):
    key = Ed25519PrivateKey.generate()
    SignedDevice.enroll(coordinator, key=key).close()
    with SignedDevice(coordinator.url, coordinator.ca_file, key=key) as again:
        r = again.enroll_request(make_token(coordinator))
    assert r.status_code == 409
    assert r.json()["error"] == "key_already_enrolled"
    assert _count(coordinator.settings, Device) == 1
    # The refused enrollment did not use up the token it presented.
    engine = make_engine(coordinator.settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            uses = sorted(s.scalars(select(EnrollmentToken.uses)))
    finally:
        engine.dispose()
    assert uses == [0, 1]


def test_repeated_enrollment_returns_the_same_device(coordinator):
    """A device whose enrollment answer was lost retries: same token, same key."""
    key = Ed25519PrivateKey.generate()
    token = make_token(coordinator, max_uses=1)
    with SignedDevice(coordinator.url, coordinator.ca_file, key=key) as device:
        first = device.enroll_request(token)
        again = device.enroll_request(token)
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["device_id"] == first.json()["device_id"]
    assert _count(coordinator.settings, Device) == 1
    # The token was used once, and another key still cannot use it.
    with SignedDevice(coordinator.url, coordinator.ca_file) as other:
        refused = other.enroll_request(token)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_token"


INVALID_ENROLLMENTS: list[tuple[str, Any]] = [
    ("public_key", "not base64!"),
    ("public_key", "AAAA"),
    ("name", ""),
    ("name", "x" * 101),
    ("name", "bad\nname"),
    ("capabilities", {"deep": [[[[[[[[[[1]]]]]]]]]]}),
    ("capabilities", {"text": "nul\x00"}),
]


def test_enroll_validates_its_body(coordinator):
    token = make_token(coordinator)
    with SignedDevice(coordinator.url, coordinator.ca_file) as device:
        for field, value in INVALID_ENROLLMENTS:
            body: dict[str, Any] = {
                "token": token,
                "public_key": device.public_key_b64,
                "name": "d",
            }
            body[field] = value
            r = device.client.post(f"{API}/device/enroll", json=body)
            assert r.status_code == 422, (field, value, r.text)
            assert r.json()["error"] == "validation_error"
            assert field in r.json()["detail"], (field, r.json())
        assert device.enroll_request(token).status_code == 201  # the token was not used


@pytest.fixture
def device(coordinator):
    with SignedDevice.enroll(coordinator) as d:
        yield d


def _tampered_query(device: SignedDevice) -> httpx.Response:
    request = device.build("GET", ME, params={"a": "1"})
    request.url = request.url.copy_with(query=b"a=2")
    return device.send(request)


def _replayed(device: SignedDevice) -> httpx.Response:
    request = device.build("GET", ME)
    assert device.send(request).status_code == 200
    return device.send(request)


BAD_REQUESTS = {
    "unsigned": (lambda d: d.get(ME, sign=False), "invalid_signature"),
    "another key": (lambda d: d.get(ME, key=Ed25519PrivateKey.generate()), "invalid_signature"),
    "tampered query": (_tampered_query, "invalid_signature"),
    "clock behind": (lambda d: d.get(ME, timestamp=int(time.time()) - 3600), "clock_skew"),
    "clock ahead": (lambda d: d.get(ME, timestamp=int(time.time()) + 3600), "clock_skew"),
    "replayed": (_replayed, "replayed_nonce"),
}


def test_bad_device_requests_are_refused_with_specific_codes(coordinator, device):
    for case, (send, code) in BAD_REQUESTS.items():
        r = send(device)
        assert r.status_code == 401, (case, r.text)
        assert r.json()["error"] == code, case
    with SignedDevice(coordinator.url, coordinator.ca_file, device_id="no-such-device") as d:
        r = d.get(ME)
    assert r.status_code == 401
    assert r.json()["error"] == "unknown_device"
    assert device.get(ME).status_code == 200


def test_replay_is_refused_after_a_restart(coordinator, device):
    request = device.build("GET", ME)
    assert device.send(request).status_code == 200
    # A second coordinator on the same database (a restart, or another replica).
    app = create_app(coordinator.settings)
    settings = coordinator.settings
    with (
        serve_in_thread(app, certfile=settings.tls_cert, keyfile=settings.tls_key) as url,
        SignedDevice(url, coordinator.ca_file, key=device.key, device_id=device.device_id) as other,
    ):
        replay = other.client.build_request("GET", ME, headers=dict(request.headers))
        r = other.send(replay)
        assert r.status_code == 401
        assert r.json()["error"] == "replayed_nonce"
        assert other.get(ME).status_code == 200
    assert _count(settings, UsedNonce) == 2


def test_revoked_device_is_refused_at_once(coordinator, device):
    assert device.get(ME).status_code == 200
    with coordinator.admin() as admin:
        r = admin.post(f"{API}/devices/{device.device_id}/revoke")
        assert r.status_code == 200
        assert r.json()["status"] == "revoked"
    r = device.get(ME)
    assert r.status_code == 403
    assert r.json()["error"] == "device_revoked"


def test_a_device_revoked_through_another_process_is_refused_and_nothing_changes(coordinator, db):
    """The coordinator keeps an active device's row in memory between requests (step 2 makes
    no lookup then); a revocation committed by another process (here: straight into the
    database) is still refused by the transaction that records the nonce, and the refused
    upload stores no update."""
    with fleet_of(coordinator, 1) as fleet:
        (device,) = fleet
        task_id = create_task(
            coordinator,
            aggregation={"clients_per_round": 1, "over_selection": 0.0, "round_deadline_s": 600},
        )
        work = wait_until(lambda: device.work(wait=1))
        runtime = coordinator.app.state.runtime
        assert runtime.authenticator.known_row(device.device_id) is not None  # remembered
        engine = make_engine(coordinator.settings.database_url)
        try:
            with session_scope(make_sessionmaker(engine)) as session:
                session.execute(
                    update(Device)
                    .where(Device.id == device.device_id)
                    .values(status="revoked", revoked_at=utcnow())
                )
        finally:
            engine.dispose()
        delta = random_delta(spec_of(work), np.random.default_rng(0))
        body = make_update(work, delta=delta, num_examples=5)
        r = device.upload(work, body)
        assert (r.status_code, r.json()["error"]) == (403, "device_revoked")
        assert db.updates(task_id) == []
        r = device.get(ME)
        assert (r.status_code, r.json()["error"]) == (403, "device_revoked")


def test_a_revocation_through_this_process_is_refused_before_the_body(coordinator, device):
    assert device.get(ME).status_code == 200
    runtime = coordinator.app.state.runtime
    assert runtime.authenticator.known_row(device.device_id) is not None
    with coordinator.admin() as admin:
        assert admin.post(f"{API}/devices/{device.device_id}/revoke").status_code == 200
    assert runtime.authenticator.known_row(device.device_id) is None
    r = device.post(f"{API}/device/assignments/1/update", content=b"x" * 100)
    assert (r.status_code, r.json()["error"]) == (403, "device_revoked")


@pytest.fixture
def limited(settings, tls_paths):
    """A coordinator with tiny limits: 5 device requests a minute, 1 KiB device bodies,
    4 KiB models."""
    tight = settings.model_copy(
        update={"device_rate_per_minute": 5, "max_upload_bytes": 1024, "max_model_bytes": 4096}
    )
    app = create_app(tight)
    admin_key, viewer_key = make_key(tight, "admin"), make_key(tight, "viewer")
    with serve_in_thread(app, certfile=tight.tls_cert, keyfile=tight.tls_key) as url:
        yield Coordinator(url, tight, app, tls_paths.ca_cert, admin_key, viewer_key)


def test_device_rate_limit_answers_429_with_retry_after(limited):
    with SignedDevice.enroll(limited) as device, SignedDevice.enroll(limited) as other:
        codes = [device.get(ME).status_code for _ in range(5)]
        assert codes == [200] * 5
        r = device.get(ME)
        assert r.status_code == 429
        assert r.json()["error"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        # The limit is per device.
        assert other.get(ME).status_code == 200


def test_device_body_limit_is_413(limited):
    with SignedDevice.enroll(limited) as device:
        path = f"{API}/device/assignments/1/metrics"
        r = device.post(path, content=b"x" * 2048, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"

        def chunks():
            for _ in range(4):
                yield b"y" * 512

        request = device.client.build_request("POST", path, content=chunks())
        request.headers.update(
            signing.auth_header(device.device_id, int(time.time()), "A" * 22, bytes(64))
        )
        assert "Content-Length" not in request.headers
        r = device.send(request)
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"


def test_model_upload_limit_is_413(limited):
    body = {
        "name": "big",
        "model": {"spec": [{"name": "w", "shape": [4]}]},
        "training": {"trainer": "pkg.mod:train"},
    }
    with limited.admin() as admin:
        task = admin.post(f"{API}/tasks", json=body).json()
        r = admin.put(f"{API}/tasks/{task['id']}/model", content=b"\0" * 5000)
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"
        too_many = {**body, "model": {"spec": [{"name": "w", "shape": [2000]}]}}
        r = admin.post(f"{API}/tasks", json=too_many)
        assert r.status_code == 422
        assert "max_model_bytes" in r.json()["detail"]


def test_oversized_bodies_are_refused_before_anything_reads_them(limited):
    big = b"[" + b"1," * (MAX_JSON_BODY // 2) + b"1]"
    assert len(big) > MAX_JSON_BODY

    def stream():  # no Content-Length: refused while it streams in
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    json_header = {"Content-Type": "application/json"}
    with limited.client() as anonymous:
        for path in (f"{API}/device/enroll", f"{API}/tasks"):
            for content in (big, stream()):
                r = anonymous.post(path, content=content, headers=json_header)
                assert r.status_code == 413, (path, r.text)
                assert r.json()["error"] == "payload_too_large"
        # The connection pool recovers: the next request is answered normally.
        r = anonymous.post(f"{API}/tasks", json={"name": "x"})
        assert r.status_code == 401
    with limited.admin() as admin:
        r = admin.put(f"{API}/tasks/1/model", content=(b"\0" * 1024 for _ in range(5)))
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"
        assert admin.get(f"{API}/tasks").json()["total"] == 0


def test_a_replayed_work_poll_is_refused_whatever_the_first_answer(coordinator, device):
    """The work poll records its nonce in its own check's transaction; a poll its route
    refused (404 for an assignment that does not exist) has used its nonce all the same."""
    work = f"{API}/device/work"
    nothing = device.build("GET", work, params={"wait": "0"})
    missing = device.build("GET", work, params={"wait": "0", "current": "999999"})
    before = _count(coordinator.settings, UsedNonce)
    assert device.send(nothing).status_code == 204
    r = device.send(missing)
    assert (r.status_code, r.json()["error"]) == (404, "not_found"), r.text
    for request in (nothing, missing):
        r = device.send(request)
        assert (r.status_code, r.json()["error"]) == (401, "replayed_nonce"), r.text
    assert _count(coordinator.settings, UsedNonce) == before + 2
