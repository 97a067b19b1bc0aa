"""Update upload: idempotency, validation against the task, size limits. Every rejection is a
4xx with a stable code and stores nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from fedge.coordinator import auth
from fedge.coordinator.models import UsedNonce
from fedge.coordinator.settings import Settings
from fedge.shared import signing
from fedge.shared.compression import compress
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import encode_update
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    Db,
    TestDevice,
    action,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

LIMIT = 4096


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_upload_bytes": LIMIT})


@dataclass
class Assigned:
    device: TestDevice
    work: dict[str, Any]
    task_id: int
    db: Db

    def body(self, **kwargs: Any) -> bytes:
        delta = random_delta(spec_of(self.work), np.random.default_rng(9))
        return make_update(self.work, delta=delta, num_examples=12, **kwargs)

    def nothing_stored(self) -> bool:
        assignment = self.db.assignments(self.task_id)[0]
        return self.db.updates(self.task_id) == [] and assignment.status == "assigned"


@pytest.fixture
def assigned(coordinator: Coordinator) -> Iterator[Assigned]:
    db = Db(coordinator.settings)
    with fleet_of(coordinator, 1) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 2,
                "over_selection": 0.0,
                "min_updates": 1,
                "round_deadline_s": 600,
            },
        )
        work = wait_until(lambda: fleet[0].work())
        yield Assigned(fleet[0], work, task_id, db)
    db.close()


def test_a_repeated_idempotency_key_answers_the_first_result(assigned: Assigned) -> None:
    body = assigned.body()
    first = assigned.device.upload(assigned.work, body, key="upload-1")
    assert first.status_code == 201, first.text
    assert first.json()["duplicate"] is False
    again = assigned.device.upload(assigned.work, body, key="upload-1")
    assert again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert len(assigned.db.updates(assigned.task_id)) == 1
    other_key = assigned.device.upload(assigned.work, body, key="upload-2")
    assert (other_key.status_code, other_key.json()["error"]) == (409, "already_uploaded")
    stored = assigned.db.updates(assigned.task_id)
    assert len(stored) == 1 and stored[0].idempotency_key == "upload-1"
    assert assigned.db.blobs.get(stored[0].blob_digest) == body
    assert assigned.db.assignments(assigned.task_id)[0].status == "uploaded"


def test_prefer_return_minimal_answers_a_short_receipt(assigned: Assigned) -> None:
    body, url = assigned.body(), assigned.work["upload_url"]

    def upload(prefer: str | None) -> httpx.Response:
        headers = {"Idempotency-Key": "k-1"}
        if prefer is not None:
            headers["Prefer"] = prefer
        return assigned.device.post(url, content=body, headers=headers)

    first = upload("respond-async, return=minimal")
    assert first.status_code == 201, first.text
    assert first.headers["content-type"] == "application/json"
    receipt = first.json()
    assert set(receipt) == {"update_id", "staleness", "duplicate"}
    assert receipt["duplicate"] is False and receipt["staleness"] == 0
    again = upload("return=minimal")
    assert (again.status_code, again.json()) == (200, {**receipt, "duplicate": True})
    full = upload(None)  # no preference, or another one: the whole answer
    representation = upload("return=representation")
    assert full.status_code == representation.status_code == 200
    assert full.json() == representation.json()
    assert {k: full.json()[k] for k in receipt} == {**receipt, "duplicate": True}
    assert len(first.content) * 2 < len(full.content)
    assert len(assigned.db.updates(assigned.task_id)) == 1


def test_the_idempotency_key_is_required(assigned: Assigned) -> None:
    cases = [({}, "missing_idempotency_key"), ({"Idempotency-Key": "not ok!"}, "bad_request")]
    for headers, code in cases:
        r = assigned.device.post(
            assigned.work["upload_url"], content=assigned.body(), headers=headers
        )
        assert (r.status_code, r.json()["error"]) == (400, code)
        assert assigned.nothing_stored()


def _other_spec(a: Assigned) -> bytes:
    delta = {"W": np.ones((5, 3), np.float32), "b": np.ones(3, np.float32)}
    return make_update(a.work, delta=delta, num_examples=3)


def _other_policy(a: Assigned) -> bytes:
    policy = CompressionPolicy(topk_fraction=0.5, bits=8, error_feedback=False)
    delta = random_delta(spec_of(a.work), np.random.default_rng(1))
    c = compress(delta, policy, np.random.default_rng(2))
    return encode_update(
        c, task_id=a.work["task_id"], base_version=a.work["base_version"], num_examples=3
    )


BAD_BODIES: list[tuple[str, Callable[[Assigned], bytes], int, str]] = [
    ("garbage", lambda a: b"definitely not an update", 400, "bad_magic"),
    ("truncated", lambda a: a.body()[:-3], 400, "truncated"),
    ("trailing", lambda a: a.body() + b"\0", 400, "trailing_bytes"),
    ("spec", _other_spec, 422, "shape_mismatch"),
    ("policy", _other_policy, 422, "policy_mismatch"),
    ("task", lambda a: a.body(task_id=a.work["task_id"] + 1), 422, "task_mismatch"),
    ("base", lambda a: a.body(base_version=7), 422, "base_version_mismatch"),
]


def test_invalid_updates_are_refused_with_their_code(assigned: Assigned) -> None:
    # One coordinator for the whole table: each case must leave nothing behind for the next.
    for name, make, status, code in BAD_BODIES:
        r = assigned.device.upload(assigned.work, make(assigned))
        assert (r.status_code, r.json()["error"]) == (status, code), (name, r.text)
        assert r.json()["detail"], name
        assert assigned.nothing_stored(), name
    # The assignment is still open for a valid update.
    assert assigned.device.upload(assigned.work, assigned.body()).status_code == 201


def test_a_body_over_the_limit_is_refused_up_front(assigned: Assigned) -> None:
    r = assigned.device.upload(assigned.work, b"\0" * (LIMIT + 1))
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert assigned.nothing_stored()


def test_the_limit_holds_while_a_body_without_length_streams_in(assigned: Assigned) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 KiB in total, far over the limit
            yield b"\0" * 1024

    path = assigned.work["upload_url"]
    headers = signing.sign_request(
        assigned.device.key, device_id=assigned.device.device_id, method="POST", path=path
    )
    headers["Idempotency-Key"] = "streamed"
    request = assigned.device.client.build_request("POST", path, content=chunks(), headers=headers)
    assert "content-length" not in request.headers
    try:
        r = assigned.device.client.send(request)
    except httpx.HTTPError:  # the server may close the connection before reading it all
        r = None
    if r is not None:
        assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert assigned.nothing_stored()


def test_uploads_to_a_task_that_is_not_running_are_refused(
    coordinator: Coordinator, assigned: Assigned
) -> None:
    body = assigned.body()
    action(coordinator, assigned.task_id, "pause")
    r = assigned.device.upload(assigned.work, body)
    assert (r.status_code, r.json()["error"]) == (409, "task_not_running")
    assert assigned.db.updates(assigned.task_id) == []


def test_metrics_are_validated(assigned: Assigned) -> None:
    aid = assigned.work["assignment_id"]
    for bad in ({"eval_accuracy": 1.5}, {"train_loss": "low"}, {"surprise": 1}):
        r = assigned.device.metrics(aid, **bad)
        assert (r.status_code, r.json()["error"]) == (422, "validation_error"), bad
    r = assigned.device.post(
        f"{API}/device/assignments/{aid}/metrics",
        content=b'{"train_loss": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert (r.status_code, r.json()["error"]) == (422, "validation_error")
    assert assigned.db.assignments(assigned.task_id)[0].metrics == {}
    assert assigned.device.metrics(aid, train_loss=0.25).status_code == 204
    assert assigned.db.assignments(assigned.task_id)[0].metrics == {"train_loss": 0.25}


def _nonces(a: Assigned) -> int:
    return a.db.read(lambda s: int(s.scalar(select(func.count()).select_from(UsedNonce)) or 0))


def test_a_replayed_upload_is_refused_whatever_the_first_answer(assigned: Assigned) -> None:
    """The upload records its nonce in its own transaction; a refused upload, a repeated
    one and an accepted one each record it all the same, so a replay is 401 every time."""
    device, url = assigned.device, assigned.work["upload_url"]
    nonces = _nonces(assigned)
    refused = device.build(
        "POST", url, content=b"not an update", headers={"Idempotency-Key": "bad-1"}
    )
    assert device.send(refused).status_code == 400
    accepted = device.build(
        "POST", url, content=assigned.body(), headers={"Idempotency-Key": "good-1"}
    )
    assert device.send(accepted).status_code == 201
    repeat = device.build(
        "POST", url, content=assigned.body(), headers={"Idempotency-Key": "good-1"}
    )
    assert device.send(repeat).status_code == 200
    for request in (refused, accepted, repeat):
        r = device.send(request)
        assert (r.status_code, r.json()["error"]) == (401, "replayed_nonce"), r.text
    assert len(assigned.db.updates(assigned.task_id)) == 1
    assert _nonces(assigned) == nonces + 3  # one per request answered, none per replay


def test_an_upload_sets_last_seen(assigned: Assigned) -> None:
    before = assigned.db.device(assigned.device.device_id).last_seen_at
    assert before is not None
    assert assigned.device.upload(assigned.work, assigned.body()).status_code == 201
    after = assigned.db.device(assigned.device.device_id)
    assert after.last_seen_at is not None and after.last_seen_at > before
    assert after.num_completed == 1


def test_a_device_revoked_after_the_first_look_is_refused_and_nothing_is_kept(
    coordinator: Coordinator, assigned: Assigned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoked between the look-up before the body and the upload's transaction: that
    transaction checks the status again (403), and keeps neither the update nor the nonce."""
    device = assigned.device
    stale_row = auth._device_row(coordinator.app.state.runtime, device.device_id)
    with coordinator.admin() as admin:
        assert admin.post(f"{API}/devices/{device.device_id}/revoke").status_code == 200
    monkeypatch.setattr(auth, "_device_row", lambda _runtime, _id: stale_row)
    nonces = _nonces(assigned)
    r = device.upload(assigned.work, assigned.body())
    assert (r.status_code, r.json()["error"]) == (403, "device_revoked")
    assert assigned.db.updates(assigned.task_id) == []
    assert _nonces(assigned) == nonces
    r = device.get(f"{API}/device/work", params={"wait": 0})
    assert (r.status_code, r.json()["error"]) == (403, "device_revoked")
    assert _nonces(assigned) == nonces
