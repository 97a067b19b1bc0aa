"""Enrollment tokens and API keys: secrets shown once and stored hashed, roles, revocation."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from fedge.coordinator.models import ApiKey, EnrollmentToken
from tests.support.device import API, SignedDevice
from tests.support.rows import db_session


def test_token_secret_is_shown_once_and_stored_hashed(coordinator):
    with coordinator.admin() as admin:
        r = admin.post(
            f"{API}/enrollment-tokens", json={"label": "rack 4", "max_uses": 3, "expires_in_s": 60}
        )
        assert r.status_code == 201, r.text
        created = r.json()
        secret = created["token"]
        assert created["status"] == "active" and created["uses"] == 0
        assert secret.startswith(created["prefix"])
        listed = admin.get(f"{API}/enrollment-tokens").json()["items"]
    assert len(listed) == 1 and "token" not in listed[0]
    assert listed[0]["label"] == "rack 4" and listed[0]["max_uses"] == 3
    with db_session(coordinator.settings) as s:
        row = s.scalars(select(EnrollmentToken)).one()
        stored = [str(v) for v in vars(row).values()]
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in v for v in stored)
    lifetime = row.expires_at - row.created_at
    assert 59 <= lifetime.total_seconds() <= 61


def test_token_uses_and_revocation_show_in_its_status(coordinator):
    with coordinator.admin() as admin:
        token = admin.post(f"{API}/enrollment-tokens", json={"max_uses": 2}).json()
        SignedDevice.enroll(coordinator, token=token["token"]).close()
        listed = admin.get(f"{API}/enrollment-tokens").json()["items"][0]
        assert (listed["uses"], listed["status"]) == (1, "active")
        revoked = admin.post(f"{API}/enrollment-tokens/{token['id']}/revoke").json()
        assert revoked["status"] == "revoked" and revoked["uses"] == 1
        r = admin.post(f"{API}/enrollment-tokens/999/revoke")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        for bad in ({"max_uses": 0}, {"expires_in_s": 0}, {"label": "x" * 201}, {"uses": 3}):
            r = admin.post(f"{API}/enrollment-tokens", json=bad)
            assert r.status_code == 422 and r.json()["error"] == "validation_error", bad
    with SignedDevice(coordinator.url, coordinator.ca_file) as late:
        r = late.enroll_request(token["token"])
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


def test_api_key_roles_and_revocation(coordinator):
    with coordinator.admin() as admin:
        r = admin.post(f"{API}/api-keys", json={"name": "dashboard", "role": "viewer"})
        assert r.status_code == 201, r.text
        viewer = r.json()
        assert viewer["key"].startswith(viewer["prefix"]) and viewer["role"] == "viewer"
        listed = admin.get(f"{API}/api-keys").json()["items"]
        assert all("key" not in k for k in listed)
        assert {k["name"] for k in listed} >= {"dashboard"}
        r = admin.post(f"{API}/api-keys", json={"name": "x", "role": "root"})
        assert r.status_code == 422 and "role" in r.json()["detail"]
    with db_session(coordinator.settings) as s:
        row = s.get(ApiKey, viewer["id"])
        assert row is not None
        assert row.key_hash == hashlib.sha256(viewer["key"].encode()).hexdigest()
    with coordinator.client(viewer["key"]) as client:
        assert client.get(f"{API}/tasks").status_code == 200
        r = client.post(f"{API}/api-keys", json={"role": "admin"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    with coordinator.admin() as admin:
        assert admin.post(f"{API}/api-keys/{viewer['id']}/revoke").json()["revoked_at"]
    with coordinator.client(viewer["key"]) as client:
        r = client.get(f"{API}/tasks")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_last_admin_key_cannot_be_revoked(coordinator):
    with coordinator.admin() as admin:
        keys = admin.get(f"{API}/api-keys").json()["items"]
        (first,) = [k for k in keys if k["role"] == "admin"]
        r = admin.post(f"{API}/api-keys/{first['id']}/revoke")
        assert r.status_code == 409 and r.json()["error"] == "conflict"
        second = admin.post(f"{API}/api-keys", json={"name": "ops", "role": "admin"}).json()
        assert admin.post(f"{API}/api-keys/{first['id']}/revoke").status_code == 200
        # The revoked key no longer works; the new one does.
        r = admin.get(f"{API}/tasks")
        assert r.status_code == 401
    with coordinator.client(second["key"]) as other:
        assert other.get(f"{API}/tasks").status_code == 200
        r = other.post(f"{API}/api-keys/{second['id']}/revoke")
        assert r.status_code == 409
        assert other.post(f"{API}/api-keys/999/revoke").status_code == 404
