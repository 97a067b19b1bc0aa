"""The device client against httpx.MockTransport: signing, retries, backoff, error mapping."""

from __future__ import annotations

import hashlib
import json
import random

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent import errors
from fedge.edge_agent.client import CoordinatorClient, Work
from fedge.edge_agent.transport import RetryPolicy
from fedge.shared import signing

WORK = {
    "assignment_id": 12,
    "status": "assigned",
    "task_id": 3,
    "round_id": 7,
    "mode": "sync",
    "base_version": 4,
    "deadline": "2026-11-25T12:00:00Z",
    "model_url": "/api/v1/device/tasks/3/models/4",
    "upload_url": "/api/v1/device/assignments/12/update",
    "compression": {"topk_fraction": 0.01, "bits": 4},
    "training": {"epochs": 1},
    "model": {"architecture": "softmax", "input_dim": 64, "num_classes": 10},
    "spec": [{"name": "W", "shape": [64, 10]}, {"name": "b", "shape": [10]}],
}


class Recorder:
    """A scripted MockTransport handler that keeps every request it saw."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(item, Exception):
            raise item
        if callable(item):
            return item(request)
        return item


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def make_client(handler, key, *, attempts=4, sleeps=None):
    sleeps = [] if sleeps is None else sleeps
    return CoordinatorClient(
        "https://coordinator.test",
        transport=httpx.MockTransport(handler),
        identity=("dev-1", key),
        retry=RetryPolicy(attempts=attempts, base_delay=0.5, max_delay=4.0),
        sleep=sleeps.append,
        rng=random.Random(0),
    )


def verify(request: httpx.Request, key: Ed25519PrivateKey) -> signing.SignedHeaders:
    signed = signing.parse_signed_headers(dict(request.headers))
    signing.verify_request(
        key.public_key(),
        signed,
        method=request.method,
        path=request.url.path,
        query=request.url.query.decode(),
        body_sha256=hashlib.sha256(request.content).hexdigest(),
    )
    return signed


def error(status, code, detail="x", headers=None):
    return httpx.Response(status, json={"error": code, "detail": detail}, headers=headers)


def test_every_device_request_is_signed_and_verifies(key):
    rec = Recorder(
        lambda r: (
            httpx.Response(200, json=WORK)
            if r.url.path.endswith("/work")
            else httpx.Response(201, json={"update_id": 1, "duplicate": False})
            if r.url.path.endswith("/update")
            else httpx.Response(204)
            if r.url.path.endswith("/metrics")
            else httpx.Response(200, content=b"model", headers={"ETag": '"abc"'})
        )
    )
    client = make_client(rec, key)
    work = client.get_work(wait=5, current=None)
    client.download_model(3, 4)
    client.upload_update(work.upload_url, b"\x00\x01payload", "key-1")
    client.report_metrics(12, {"train_loss": 0.5})
    assert len(rec.requests) == 4
    for request in rec.requests:
        signed = verify(request, key)
        assert signed.device_id == "dev-1"
    assert rec.requests[0].url.query == b"wait=5"
    assert rec.requests[2].headers["Idempotency-Key"] == "key-1"
    assert rec.requests[2].content == b"\x00\x01payload"
    assert json.loads(rec.requests[3].content) == {"train_loss": 0.5}
    nonces = {verify(r, key).nonce for r in rec.requests}
    assert len(nonces) == 4


def test_a_tampered_signed_request_does_not_verify(key):
    rec = Recorder(httpx.Response(204))
    make_client(rec, key).report_metrics(1, {"train_loss": 1.0})
    request = rec.requests[0]
    tampered = httpx.Request(
        request.method, request.url, headers=request.headers, content=b'{"train_loss": 0.0}'
    )
    with pytest.raises(signing.SignatureError):
        verify(tampered, key)


def test_enroll_is_not_signed_and_returns_device_id(key):
    rec = Recorder(httpx.Response(201, json={"device_id": "abc", "name": "n"}))
    client = CoordinatorClient("https://c.test", transport=httpx.MockTransport(rec))
    assert client.enroll("tok", "n", {"cpu": 2}, public_key="pubkey") == "abc"
    assert signing.HEADER_AUTH not in rec.requests[0].headers
    assert json.loads(rec.requests[0].content) == {
        "token": "tok",
        "public_key": "pubkey",
        "name": "n",
        "capabilities": {"cpu": 2},
    }


def test_get_work_parses_assignment_and_204(key):
    rec = Recorder(httpx.Response(200, json=WORK), httpx.Response(204))
    client = make_client(rec, key)
    work = client.get_work(wait=30)
    assert isinstance(work, Work)
    assert (work.assignment_id, work.task_id, work.base_version) == (12, 3, 4)
    assert work.spec[0]["name"] == "W"
    assert client.get_work(wait=30, current=12) is None
    assert rec.requests[1].url.params["current"] == "12"


def test_cancelled_answer(key):
    rec = Recorder(httpx.Response(200, json={"assignment_id": 12, "status": "cancelled"}))
    work = make_client(rec, key).get_work(wait=1, current=12)
    assert work is not None and work.cancelled and work.assignment_id == 12


def test_wait_is_clamped_and_timeout_covers_the_wait(key):
    rec = Recorder(httpx.Response(204))
    make_client(rec, key).get_work(wait=600)
    request = rec.requests[0]
    assert request.url.params["wait"] == "60"
    assert request.extensions["timeout"]["read"] >= 60


def test_download_with_etag_gives_304(key):
    rec = Recorder(httpx.Response(304, headers={"ETag": '"abc"'}))
    client = make_client(rec, key)
    data, etag = client.download_model(3, 4, etag='"abc"')
    assert data is None and etag == '"abc"'
    assert rec.requests[0].headers["If-None-Match"] == '"abc"'
    assert client.traffic.not_modified == 1 and client.traffic.model_bytes == 0


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        error(500, "internal"),
        error(502, "bad_gateway"),
        error(503, "unavailable"),
    ],
    ids=["connect", "timeout", "500", "502", "503"],
)
def test_transient_failures_are_retried_with_growing_backoff(key, failure):
    sleeps: list[float] = []
    rec = Recorder(failure, failure, failure, httpx.Response(204))
    make_client(rec, key, attempts=4, sleeps=sleeps).report_metrics(1, {"train_loss": 1.0})
    assert len(rec.requests) == 4
    assert len(sleeps) == 3
    # exponential with jitter in [50%, 100%] of 0.5 * 2**n
    for n, delay in enumerate(sleeps):
        assert 0.25 * 2**n <= delay <= 0.5 * 2**n
    # every attempt is signed afresh
    assert len({verify(r, key).nonce for r in rec.requests}) == 4
    for request in rec.requests:
        verify(request, key)


def test_backoff_is_capped():
    policy = RetryPolicy(attempts=10, base_delay=1.0, max_delay=3.0)
    rng = random.Random(1)
    assert max(policy.backoff(n, rng) for n in range(10)) <= 3.0


def test_429_waits_at_least_retry_after(key):
    sleeps: list[float] = []
    rec = Recorder(error(429, "rate_limited", headers={"Retry-After": "7"}), httpx.Response(204))
    make_client(rec, key, sleeps=sleeps).report_metrics(1, {})
    assert sleeps == [7.0]


def test_gives_up_after_attempts_with_the_last_error(key):
    sleeps: list[float] = []
    rec = Recorder(httpx.ConnectError("refused"))
    with pytest.raises(errors.Unreachable) as exc:
        make_client(rec, key, attempts=3, sleeps=sleeps).me()
    assert len(rec.requests) == 3 and len(sleeps) == 2
    assert exc.value.status is None and "ConnectError" in exc.value.detail

    rec = Recorder(error(503, "not_ready", "db down"))
    with pytest.raises(errors.ServerError) as exc:
        make_client(rec, key, attempts=2).me()
    assert (exc.value.status, exc.value.code, exc.value.detail) == (503, "not_ready", "db down")


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_header", errors.ApiError),
        (401, "invalid_signature", errors.AuthError),
        (401, "clock_skew", errors.AuthError),
        (403, "device_revoked", errors.DeviceRevoked),
        (403, "not_your_assignment", errors.Forbidden),
        (404, "not_found", errors.NotFound),
        (409, "stale_update", errors.StaleUpdate),
        (409, "already_uploaded", errors.AlreadyUploaded),
        (409, "task_not_running", errors.TaskNotRunning),
        (413, "payload_too_large", errors.ApiError),
        (422, "shape_mismatch", errors.ApiError),
    ],
)
def test_4xx_is_not_retried_and_maps_to_the_error_family(key, status, code, cls):
    sleeps: list[float] = []
    rec = Recorder(error(status, code, "plain words"))
    with pytest.raises(cls) as exc:
        make_client(rec, key, sleeps=sleeps).upload_update("/api/v1/x", b"b", "k")
    assert len(rec.requests) == 1 and sleeps == []
    assert (exc.value.status, exc.value.code, exc.value.detail) == (status, code, "plain words")
    assert isinstance(exc.value, errors.AgentError)


def test_error_without_json_body():
    rec = Recorder(httpx.Response(404, text="<html>nope</html>"))
    client = CoordinatorClient("https://c.test", transport=httpx.MockTransport(rec))
    with pytest.raises(errors.NotFound) as exc:
        client.enroll("t", "n", public_key="k")
    assert exc.value.code == "http_404" and "nope" in exc.value.detail


def test_unenrolled_client_cannot_sign():
    client = CoordinatorClient("https://c.test", transport=httpx.MockTransport(Recorder()))
    with pytest.raises(errors.AgentError, match="enroll"):
        client.me()


def test_interrupted_retry_loop_stops_early(key):
    sleeps: list[float] = []
    stop = {"now": False}

    def sleep(seconds):
        sleeps.append(seconds)
        stop["now"] = True

    rec = Recorder(httpx.ConnectError("refused"))
    client = CoordinatorClient(
        "https://c.test",
        transport=httpx.MockTransport(rec),
        identity=("d", key),
        retry=RetryPolicy(attempts=10),
        sleep=sleep,
        interrupted=lambda: stop["now"],
    )
    with pytest.raises(errors.Unreachable):
        client.me()
    assert len(rec.requests) == 1 and len(sleeps) == 1


def test_upload_counts_traffic(key):
    rec = Recorder(httpx.Response(201, json={"update_id": 5}))
    client = make_client(rec, key)
    receipt = client.upload_update("/api/v1/device/assignments/1/update", b"x" * 100, "k")
    assert receipt == {"update_id": 5}
    assert (client.traffic.uploads, client.traffic.upload_bytes) == (1, 100)
