"""A small in-memory stand-in for the coordinator's device API, behind httpx.MockTransport.

It follows docs/protocol.md closely enough to unit-test the agent loop without a server:
signature checks, long-poll waits (bounded), ETags, idempotency keys, 409 stale_update and
cancellation. The real coordinator is exercised by test_integration.py.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.shared import architectures, signing
from fedge.shared.modelspec import Weights
from fedge.shared.wire import decode_update, encode_model

MODEL = {"architecture": "softmax", "input_dim": 64, "num_classes": 10, "hidden": []}
COMPRESSION = {"topk_fraction": 0.05, "bits": 4, "chunk": 64, "error_feedback": True}
TRAINING = {"epochs": 1, "batch_size": 32, "lr": 0.1}


@dataclass
class Received:
    assignment_id: int
    key: str
    body: bytes
    delta: Weights
    metrics: dict[str, float] = field(default_factory=dict)  # the update's metrics block


@dataclass
class FakeCoordinator:
    public_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    models: dict[int, bytes] = field(default_factory=dict)
    queue: list[dict[str, Any]] = field(default_factory=list)
    cancelled: set[int] = field(default_factory=set)
    stale: set[int] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    fail_uploads: int = 0
    #: Assignments whose uploads are refused for good (422); like the coordinator, the
    #: assignment stays active, so the next work poll answers it again until it is declined.
    refused: set[int] = field(default_factory=set)
    offered: dict[int, dict[str, Any]] = field(default_factory=dict)
    received: dict[str, Received] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # separate reports
    requests: list[httpx.Request] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)  # capability reports
    declines: dict[int, dict[str, Any]] = field(default_factory=dict)
    max_wait_s: float = 0.2

    def __post_init__(self) -> None:
        self.changed = threading.Condition()
        self.set_model(0, architectures.init_weights(MODEL, np.random.default_rng(0)))

    # -- scripting -------------------------------------------------------------------------

    def set_model(self, version: int, weights: Weights) -> None:
        self.models[version] = encode_model(weights)

    def assign(self, assignment_id: int, *, version: int = 0, task_id: int = 1, **extra: Any):
        spec = architectures.build_spec(MODEL).to_dict()
        work = {
            "assignment_id": assignment_id,
            "status": "assigned",
            "task_id": task_id,
            "round_id": assignment_id,
            "mode": "sync",
            "base_version": version,
            "deadline": None,
            "model_url": f"/api/v1/device/tasks/{task_id}/models/{version}",
            "upload_url": f"/api/v1/device/assignments/{assignment_id}/update",
            "compression": dict(COMPRESSION),
            "training": dict(TRAINING),
            "model": dict(MODEL),
            "spec": spec,
        } | extra
        with self.changed:
            self.offered[assignment_id] = work
            self.queue.append(work)
            self.changed.notify_all()

    def cancel(self, assignment_id: int) -> None:
        with self.changed:
            self.cancelled.add(assignment_id)
            self.changed.notify_all()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- the API ---------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/v1/device/enroll":
            body = json.loads(request.content)
            device_id = f"dev{len(self.public_keys) + 1}"
            self.public_keys[device_id] = signing.public_key_from_b64(body["public_key"])
            return httpx.Response(201, json={"device_id": device_id, "name": body["name"]})
        try:
            signed = signing.parse_signed_headers(dict(request.headers))
            key = self.public_keys[signed.device_id]
            signing.verify_request(
                key,
                signed,
                method=request.method,
                path=path,
                query=request.url.query.decode(),
                body_sha256=hashlib.sha256(request.content).hexdigest(),
            )
        except (signing.SignatureError, KeyError):
            return _error(401, "invalid_signature")
        if signed.device_id in self.revoked:
            return _error(403, "device_revoked")
        parts = path.split("/")
        if path == "/api/v1/device/work":
            return self._work(request)
        if path == "/api/v1/device/capabilities" and request.method == "PUT":
            self.reports.append(json.loads(request.content))
            return httpx.Response(200, json={"device_id": signed.device_id})
        if len(parts) < 7:
            return _error(404, "not_found")
        if parts[4] == "assignments" and parts[6] == "decline":
            decline = json.loads(request.content)
            self.declines[int(parts[5])] = decline
            self.cancel(int(parts[5]))
            return httpx.Response(200, json={"assignment_id": int(parts[5]), **decline})
        if parts[4:6] == ["tasks", parts[5]] and parts[6] == "models":
            data = self.models.get(int(parts[7]))
            if data is None:
                return _error(404, "not_found")
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            if request.headers.get("If-None-Match") == etag:
                return httpx.Response(304, headers={"ETag": etag})
            return httpx.Response(200, content=data, headers={"ETag": etag})
        if parts[4] == "assignments" and parts[6] == "update":
            return self._upload(int(parts[5]), request)
        if parts[4] == "assignments" and parts[6] == "metrics":
            self.metrics[int(parts[5])] = json.loads(request.content)
            return httpx.Response(204)
        return _error(404, "not_found")

    def _work(self, request: httpx.Request) -> httpx.Response:
        wait = min(float(request.url.params.get("wait", "0")), self.max_wait_s)
        current = request.url.params.get("current")
        with self.changed:
            if current is not None:
                self.changed.wait_for(lambda: int(current) in self.cancelled, timeout=wait)
                if int(current) in self.cancelled:
                    return httpx.Response(
                        200, json={"assignment_id": int(current), "status": "cancelled"}
                    )
                return httpx.Response(204)
            self.changed.wait_for(lambda: bool(self.queue), timeout=wait)
            if self.queue:
                return httpx.Response(200, json=self.queue.pop(0))
        return httpx.Response(204)

    def _upload(self, assignment_id: int, request: httpx.Request) -> httpx.Response:
        if self.fail_uploads > 0:
            self.fail_uploads -= 1
            return _error(503, "unavailable")
        key = request.headers["Idempotency-Key"]
        if key in self.received:
            return httpx.Response(200, json={"assignment_id": assignment_id, "duplicate": True})
        if assignment_id in self.stale:
            return _error(409, "stale_update", "base version too old")
        if assignment_id in self.refused:
            with self.changed:
                if assignment_id not in self.declines:
                    self.queue.insert(0, self.offered[assignment_id])  # it is still active
                    self.changed.notify_all()
            return _error(422, "update_out_of_range", "a value beyond max_update_abs")
        if any(r.assignment_id == assignment_id for r in self.received.values()):
            return _error(409, "already_uploaded")
        update = decode_update(request.content)
        self.received[key] = Received(
            assignment_id, key, request.content, update.to_dense(), update.metrics
        )
        return httpx.Response(
            201,
            json={
                "update_id": len(self.received),
                "assignment_id": assignment_id,
                "staleness": 0,
                "status": "accepted",
                "duplicate": False,
            },
        )


def _error(status: int, code: str, detail: str = "refused") -> httpx.Response:
    return httpx.Response(status, json={"error": code, "detail": detail})
