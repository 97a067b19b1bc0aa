"""Authorization matrix generated from the application's routes (its OpenAPI paths).

Every admin route (everything under /api/v1 but the device API) refuses a missing or unknown
API key with 401, and every mutating one refuses a viewer key with 403; every signed device
route (under /api/v1/device, except enrollment) refuses unsigned, badly signed, replayed and
skewed requests with 401 and a revoked device with 403. Routes added later are covered
automatically, because the lists below come from ``app.routes``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.device import API, SignedDevice

DEVICE_PREFIX = f"{API}/device"
UNSIGNED_DEVICE_ROUTES = {f"{DEVICE_PREFIX}/enroll"}
READ_METHODS = {"GET", "HEAD"}


@dataclass(frozen=True)
class Route:
    method: str
    template: str

    @property
    def path(self) -> str:
        # "1" fits every path parameter's type (integer ids, device ids, versions).
        return re.sub(r"\{[^}]+\}", "1", self.template)

    @property
    def mutating(self) -> bool:
        return self.method not in READ_METHODS

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def routes(app) -> tuple[list[Route], list[Route]]:
    """(admin routes, signed device routes) of ``app``, from its OpenAPI document (which
    lists every route the app serves)."""
    admin, device = [], []
    for path, operations in app.openapi()["paths"].items():
        if not path.startswith(f"{API}/"):
            continue
        for method in sorted(operations):
            r = Route(method.upper(), path)
            if path.startswith(f"{DEVICE_PREFIX}/"):
                if path not in UNSIGNED_DEVICE_ROUTES:
                    device.append(r)
            else:
                admin.append(r)
    return admin, device


def test_the_matrix_sees_the_known_routes(coordinator):
    admin, device = routes(coordinator.app)
    names = {str(r) for r in admin + device}
    expected = {
        f"POST {API}/tasks",
        f"PUT {API}/tasks/{{task_id}}/model",
        f"POST {API}/tasks/{{task_id}}/cancel",
        f"GET {API}/tasks/{{task_id}}/models/{{version}}",
        f"POST {API}/devices/{{device_id}}/revoke",
        f"PATCH {API}/devices/{{device_id}}",
        f"GET {API}/devices/{{device_id}}/declines",
        f"GET {API}/tasks/{{task_id}}/rounds/{{number}}/declines",
        f"PUT {DEVICE_PREFIX}/capabilities",
        f"POST {DEVICE_PREFIX}/assignments/{{assignment_id}}/decline",
        f"POST {API}/api-keys",
        f"GET {DEVICE_PREFIX}/me",
        f"GET {DEVICE_PREFIX}/tasks/{{task_id}}/models/{{version}}",
    }
    assert expected <= names
    assert f"POST {DEVICE_PREFIX}/enroll" not in names
    assert sum(r.mutating for r in admin) >= 10


def test_admin_routes_refuse_missing_and_unknown_keys(coordinator):
    admin_routes, _ = routes(coordinator.app)
    bad_keys = (None, "fk_not-a-key", coordinator.admin_key + "x")
    for key in bad_keys:
        with coordinator.client(key) as client:
            for route in admin_routes:
                r = client.request(route.method, route.path)
                assert r.status_code == 401, (str(route), key, r.text)
                assert r.json()["error"] == "unauthorized", str(route)
    with coordinator.client() as client:
        r = client.get(f"{API}/tasks", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
        assert r.status_code == 401


def test_viewer_key_is_refused_on_every_mutating_admin_route(coordinator):
    admin_routes, _ = routes(coordinator.app)
    with coordinator.viewer() as viewer:
        for route in admin_routes:
            r = viewer.request(route.method, route.path)
            if route.mutating:
                assert r.status_code == 403, (str(route), r.text)
                assert r.json()["error"] == "forbidden", str(route)
            else:  # reads are allowed: whatever the answer, it is not an auth error
                assert r.status_code not in (401, 403), (str(route), r.text)


def test_device_signature_does_not_open_admin_routes(coordinator):
    admin_routes, _ = routes(coordinator.app)
    with SignedDevice.enroll(coordinator) as device:
        for route in admin_routes:
            r = device.request(route.method, route.path)
            assert r.status_code == 401, str(route)


@pytest.fixture
def devices(coordinator):
    good = SignedDevice.enroll(coordinator, name="good")
    revoked = SignedDevice.enroll(coordinator, name="revoked")
    with coordinator.admin() as admin:
        admin.post(f"{API}/devices/{revoked.device_id}/revoke").raise_for_status()
    yield good, revoked
    good.close()
    revoked.close()


def test_device_routes_refuse_every_bad_request(coordinator, devices):
    good, revoked = devices
    _, device_routes = routes(coordinator.app)
    assert device_routes
    skew = coordinator.settings.signature_skew_s
    for route in device_routes:
        where = str(route)
        cases = {
            "unsigned": (
                good.request(route.method, route.path, sign=False),
                401,
                "invalid_signature",
            ),
            "other key": (
                good.request(route.method, route.path, key=Ed25519PrivateKey.generate()),
                401,
                "invalid_signature",
            ),
            "skewed": (
                good.request(route.method, route.path, timestamp=int(time.time()) - 2 * skew),
                401,
                "clock_skew",
            ),
            "revoked": (revoked.request(route.method, route.path), 403, "device_revoked"),
        }
        with coordinator.admin() as admin:
            cases["admin key"] = (admin.request(route.method, route.path), 401, "invalid_signature")
        request = good.build(route.method, route.path)
        first = good.send(request)
        assert first.status_code not in (401, 403) or first.json()["error"] not in (
            "invalid_signature",
            "replayed_nonce",
            "clock_skew",
            "unknown_device",
        ), (where, first.text)
        cases["replayed"] = (good.send(request), 401, "replayed_nonce")
        for case, (response, status, code) in cases.items():
            assert response.status_code == status, (where, case, response.text)
            assert response.json() == {"error": code, "detail": response.json()["detail"]}, (
                where,
                case,
            )


def test_device_with_a_tampered_body_is_refused(coordinator, devices):
    good, _ = devices
    _, device_routes = routes(coordinator.app)
    posts = [r for r in device_routes if r.method == "POST"]
    for route in posts:
        request = good.build(route.method, route.path, content=b"signed body")
        request.stream = httpx.ByteStream(b"other body")
        request.headers["Content-Length"] = str(len(b"other body"))
        r = good.send(request)
        assert r.status_code == 401, (str(route), r.text)
        assert r.json()["error"] == "invalid_signature"
