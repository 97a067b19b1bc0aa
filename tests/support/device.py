"""A signed test device: an Ed25519 identity enrolled through the real API.

Usage (``coordinator`` is the fixture of tests/coordinator/conftest.py)::

    device = SignedDevice.enroll(coordinator)          # makes a token with the admin key
    r = device.get("/api/v1/device/me")                 # signed request
    r = device.post("/api/v1/device/assignments/1/update", content=blob,
                    headers={"Idempotency-Key": "k1"})
    req = device.build("GET", "/api/v1/device/me")      # a signed request, not sent
    device.send(req); device.send(req)                  # the second one is a replay
    device.get(path, timestamp=int(time.time()) - 3600) # skewed clock
    device.get(path, sign=False)                        # no signature headers

Every request is signed over the request as it will be sent (method, ``url.path``,
``url.query``, body), exactly as the edge agent does.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared import signing

API = "/api/v1"


class _Server(Protocol):
    url: str
    ca_file: Path

    def admin(self) -> httpx.Client: ...


def make_token(server: _Server, *, max_uses: int = 1, expires_in_s: int = 3600) -> str:
    """A fresh enrollment token secret, created through the admin API."""
    with server.admin() as admin:
        r = admin.post(
            f"{API}/enrollment-tokens", json={"max_uses": max_uses, "expires_in_s": expires_in_s}
        )
        r.raise_for_status()
        token: str = r.json()["token"]
        return token


class SignedDevice:
    """One device identity and an HTTPS client that signs its requests."""

    def __init__(
        self,
        base_url: str,
        ca_file: Path,
        *,
        key: Ed25519PrivateKey | None = None,
        device_id: str = "",
    ) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.device_id = device_id
        self.client = httpx.Client(
            base_url=base_url,
            verify=ssl.create_default_context(cafile=str(ca_file)),
            timeout=30,
        )

    @property
    def public_key_b64(self) -> str:
        return signing.public_key_to_b64(self.key.public_key())

    @classmethod
    def enroll(
        cls,
        server: _Server,
        *,
        token: str | None = None,
        name: str = "test-device",
        capabilities: dict[str, Any] | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> SignedDevice:
        """Enroll a new identity (with a fresh one-use token unless one is given)."""
        device = cls(server.url, server.ca_file, key=key)
        r = device.enroll_request(
            token if token is not None else make_token(server),
            name=name,
            capabilities=capabilities,
        )
        if r.status_code != 201:
            device.close()
            raise AssertionError(f"enrollment failed: {r.status_code} {r.text}")
        device.device_id = r.json()["device_id"]
        return device

    def enroll_request(
        self, token: str, *, name: str = "test-device", capabilities: dict[str, Any] | None = None
    ) -> httpx.Response:
        """POST /device/enroll with this identity's key; the raw response."""
        return self.client.post(
            f"{API}/device/enroll",
            json={
                "token": token,
                "public_key": self.public_key_b64,
                "name": name,
                "capabilities": capabilities or {},
            },
        )

    def build(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        sign: bool = True,
        timestamp: int | None = None,
        nonce: str | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> httpx.Request:
        """A request signed over its final form (``key`` overrides the identity's key)."""
        request = self.client.build_request(
            method, path, params=params, json=json, content=content, headers=headers
        )
        if sign:
            request.headers.update(
                signing.sign_request(
                    key or self.key,
                    device_id=self.device_id,
                    method=request.method,
                    path=request.url.path,
                    query=request.url.query.decode("ascii"),
                    body=request.content,
                    timestamp=timestamp,
                    nonce=nonce,
                )
            )
        return request

    def send(self, request: httpx.Request) -> httpx.Response:
        return self.client.send(request)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.send(self.build(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SignedDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_scope(path: str, query: str = "", method: str = "GET") -> dict[str, Any]:
    """The ASGI scope of a request, as far as a route's ``matches`` reads it."""
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": query.encode(),
    }
