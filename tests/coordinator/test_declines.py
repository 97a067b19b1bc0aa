"""A device that cannot work on an assignment declines it at once (a signed request with a
reason): its round takes a replacement instead of waiting for the deadline, the decline is
visible per device and per round, and a task that cannot reach its quorum says why in its
``status_reason``. Tags are set by administrators; capabilities are reported by devices."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.coordinator.models import Assignment
from fedge.coordinator.states import AssignmentStatus, RoundStatus, TaskStatus
from fedge.shared import signing
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    Db,
    Fleet,
    TestDevice,
    create_task,
    every_device,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

DECLINE = "/device/assignments/{}/decline"


@pytest.fixture
def fleet(coordinator: Coordinator) -> Iterator[Fleet]:
    fleet = Fleet.enroll(coordinator, 3)
    yield fleet
    fleet.close()


def active(db: Db, task_id: int) -> list[Assignment]:
    return [
        a
        for a in db.assignments(task_id)
        if a.status in (AssignmentStatus.ASSIGNED, AssignmentStatus.DOWNLOADED)
    ]


def working(db: Db, task_id: int, n: int) -> list[Assignment]:
    """The task's active assignments once there are ``n`` of them."""
    return wait_until(
        lambda: (lambda found: found if len(found) == n else None)(active(db, task_id))
    )


def upload(device: TestDevice, work: dict[str, object], seed: int) -> None:
    rng = np.random.default_rng(seed)
    body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=10)
    r = device.upload(work, body)
    assert r.status_code == 201, r.text


def test_a_decline_is_replaced_at_once_and_the_round_closes_on_its_updates(
    coordinator: Coordinator, fleet: Fleet, db: Db
) -> None:
    task_id = create_task(coordinator, aggregation=every_device(2, deadline_s=600))
    first, second = working(db, task_id, 2)
    decliner = fleet.by_id(first.device_id)
    r = decliner.decline(first.id, "no_trainer", "trainer mlp is not installed")
    assert r.status_code == 200, r.text
    declined = r.json()
    assert declined["reason"] == "no_trainer" and declined["round_number"] == 1
    # Its long-poll answers the cancellation; the idle device is picked in its place.
    assert decliner.work(wait=0, current=first.id)["status"] == "cancelled"
    (spare,) = [d for d in fleet if d.device_id not in (first.device_id, second.device_id)]
    replacement = spare.work(wait=10)
    assert replacement is not None and replacement["round_id"] == first.round_id
    rnd = db.round(task_id, 1)
    assert rnd is not None and (rnd.num_assigned, rnd.num_declined, rnd.num_dropped) == (3, 1, 0)
    device = db.device(decliner.device_id)
    assert (device.num_declined, device.num_dropped) == (1, 0)

    # Declining again answers the first decline and counts nothing twice.
    again = decliner.decline(first.id, "other", "again")
    assert again.status_code == 200 and again.json() == declined
    assert db.device(decliner.device_id).num_declined == 1

    second_work = fleet.by_id(second.device_id).work(wait=0)
    assert second_work is not None
    # A declined assignment's place went to another device: its update is not taken.
    late = make_update(
        second_work,
        delta=random_delta(spec_of(second_work), np.random.default_rng(0)),
        num_examples=5,
    )
    refused = decliner.upload(
        {**second_work, "upload_url": f"{API}/device/assignments/{first.id}/update"}, late
    )
    assert (refused.status_code, refused.json()["error"]) == (409, "assignment_declined")
    upload(fleet.by_id(second.device_id), second_work, 1)
    upload(spare, replacement, 2)
    closed = db.wait_round(task_id, 1, closed=True)
    assert closed.status == RoundStatus.CLOSED and closed.result_version == 1
    assert closed.deadline_at is not None and closed.closed_at is not None
    assert closed.closed_at < closed.deadline_at  # on its updates, not at the deadline

    # Visible per round and per device, to viewers too.
    with coordinator.viewer() as viewer:
        per_round = viewer.get(f"{API}/tasks/{task_id}/rounds/1/declines").json()
        per_device = viewer.get(f"{API}/devices/{decliner.device_id}/declines").json()
        round_body = viewer.get(f"{API}/tasks/{task_id}/rounds/1").json()
        device_body = viewer.get(f"{API}/devices/{decliner.device_id}").json()
    assert per_round["total"] == per_device["total"] == 1
    assert per_round["items"] == per_device["items"] == [declined]
    assert declined["detail"] == "trainer mlp is not installed"
    assert (round_body["num_declined"], device_body["num_declined"]) == (1, 1)

    # An assignment that ended otherwise cannot be declined; nor can another device's.
    ended = spare.decline(replacement["assignment_id"], "other")
    assert (ended.status_code, ended.json()["error"]) == (409, "assignment_ended")
    theirs = spare.decline(first.id, "other")
    assert (theirs.status_code, theirs.json()["error"]) == (403, "not_your_assignment")
    missing = spare.decline(10_000, "other")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"reason": "bored"},
        {"reason": "other", "detail": "x" * 501},
        {"reason": "other", "extra": 1},
        {},
    ],
)
def test_a_malformed_decline_is_refused_and_changes_nothing(
    coordinator: Coordinator, fleet: Fleet, db: Db, body: dict[str, object]
) -> None:
    task_id = create_task(coordinator, aggregation=every_device(1, deadline_s=600))
    (a,) = working(db, task_id, 1)
    r = fleet.by_id(a.device_id).post(f"{API}{DECLINE.format(a.id)}", json=body)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}
    assert [x.status for x in active(db, task_id)] == [AssignmentStatus.ASSIGNED]
    assert db.device(a.device_id).num_declined == 0


def test_a_replayed_or_forged_decline_is_refused_and_changes_nothing(
    coordinator: Coordinator, fleet: Fleet, db: Db
) -> None:
    task_id = create_task(coordinator, aggregation=every_device(1, deadline_s=600))
    (a,) = working(db, task_id, 1)
    device = fleet.by_id(a.device_id)
    path = f"{API}{DECLINE.format(a.id)}"
    body = {"reason": "data_mismatch", "detail": "12 features, not 4"}

    def refused(request: httpx.Request, code: str) -> None:
        r = device.send(request)
        assert (r.status_code, r.json()["error"]) == (401, code), r.text
        assert [x.id for x in active(db, task_id)] == [a.id]
        assert db.device(device.device_id).num_declined == 0

    def with_signature_of(signed: httpx.Request, **kwargs: object) -> httpx.Request:
        """A request carrying ``signed``'s signature header over other content."""
        auth = {signing.HEADER_AUTH: signed.headers[signing.HEADER_AUTH]}
        return device.client.build_request("POST", path, headers=auth, **kwargs)  # type: ignore[arg-type]

    wrong_key = device.build("POST", path, json=body, key=Ed25519PrivateKey.generate())
    refused(wrong_key, "invalid_signature")
    signed = device.build("POST", path, json=body)
    refused(with_signature_of(signed, json={**body, "reason": "other"}), "invalid_signature")
    refused(device.build("POST", path, json=body, sign=False), "invalid_signature")
    stale = device.build("POST", path, json=body, timestamp=int(time.time()) - 3600)
    refused(stale, "clock_skew")
    # The signed request is taken once; the same request again is a replay.
    first = device.send(with_signature_of(signed, json=body))
    assert first.status_code == 200, first.text
    replay = device.send(with_signature_of(signed, json=body))
    assert (replay.status_code, replay.json()["error"]) == (401, "replayed_nonce"), replay.text
    assert db.device(device.device_id).num_declined == 1
    assert db.round(task_id, 1).num_declined == 1  # type: ignore[union-attr]


def test_when_everyone_declines_the_round_fails_at_once_and_the_task_says_why(
    coordinator: Coordinator, fleet: Fleet, db: Db
) -> None:
    task_id = create_task(coordinator, aggregation=every_device(3, deadline_s=600))
    for a in working(db, task_id, 3):
        assert fleet.by_id(a.device_id).decline(a.id, "no_trainer").status_code == 200
    failed = db.wait_round(task_id, 1, closed=True)
    assert failed.status == RoundStatus.FAILED
    assert failed.closed_at is not None and failed.deadline_at is not None
    assert failed.closed_at < failed.deadline_at
    assert "declined" in (failed.status_reason or "")
    task = db.wait_task(task_id, lambda t: "3 declined this task" in (t.status_reason or ""))
    assert task.status == TaskStatus.RUNNING
    assert task.status_reason.startswith("waiting for eligible devices: 0 of the 3 needed")
    with coordinator.viewer() as viewer:
        assert viewer.get(f"{API}/tasks/{task_id}").json()["status_reason"] == task.status_reason

    # A device that reports its capabilities anew is offered the task again: the task recovers.
    for device in fleet:
        assert device.report(trainers=["softmax"], feature_shape=[4]).status_code == 200
    db.wait_round(task_id, 2)
    assert db.wait_task(task_id, lambda t: t.status_reason is None).status == TaskStatus.RUNNING


def test_a_task_needing_a_tag_waits_and_says_so_until_an_admin_tags_a_device(
    coordinator: Coordinator, fleet: Fleet, db: Db
) -> None:
    requirements = {"tags": ["lab"], "feature_shape": [4]}
    task_id = create_task(
        coordinator, aggregation=every_device(1, deadline_s=600), requirements=requirements
    )
    task = db.wait_task(task_id, lambda t: t.status_reason is not None)
    assert task.status_reason == (
        "waiting for eligible devices: 0 of the 1 needed are live, idle and meet the "
        "requirements (tags lab; feature shape [4])"
    )
    target = fleet[1]
    with coordinator.viewer() as viewer:
        shown = viewer.get(f"{API}/tasks/{task_id}").json()["requirements"]
        assert shown == {**requirements, "trainer": None, "label_kind": None, "min_examples": None}
        denied = viewer.patch(f"{API}/devices/{target.device_id}", json={"tags": ["lab"]})
        assert denied.status_code == 403
    with coordinator.admin() as admin:
        for bad in ({"tags": ["no spaces"]}, {"tags": "lab"}, {"tags": ["lab"], "name": "x"}):
            r = admin.patch(f"{API}/devices/{target.device_id}", json=bad)
            assert r.status_code == 422 and set(r.json()) == {"error", "detail"}
        assert admin.patch(f"{API}/devices/nobody", json={"tags": []}).status_code == 404
        assert db.device(target.device_id).tags == []
        r = admin.patch(f"{API}/devices/{target.device_id}", json={"tags": ["lab", "b", "lab"]})
        assert r.status_code == 200 and r.json()["tags"] == ["b", "lab"]
    # Tagged, but its data's shape is unreported: still not eligible.
    assert target.report(feature_shape=[8]).status_code == 200
    assert target.work(wait=1) is None
    reported = target.report(feature_shape=[4], trainers=["softmax"], poll_interval_s=5)
    assert reported.status_code == 200
    assert reported.json()["capabilities"]["feature_shape"] == [4]
    assert reported.json()["capabilities_at"] is not None
    work = target.work(wait=10)
    assert work is not None and work["task_id"] == task_id
    assert [a.device_id for a in db.assignments(task_id)] == [target.device_id]
    assert db.wait_task(task_id, lambda t: t.status_reason is None)


@pytest.mark.parametrize(
    "report",
    [
        {"feature_shape": [0]},
        {"feature_shape": []},
        {"label_kind": "pixels"},
        {"poll_interval_s": 0},
        {"trainers": "softmax"},
        {"cpus": 4},
    ],
)
def test_a_malformed_capability_report_is_refused_and_changes_nothing(
    coordinator: Coordinator, fleet: Fleet, db: Db, report: dict[str, object]
) -> None:
    device = fleet[0]
    assert device.report(trainers=["softmax"]).status_code == 200
    before = db.device(device.device_id)
    r = device.report(**report)
    assert r.status_code == 422 and set(r.json()) == {"error", "detail"}, r.text
    after = db.device(device.device_id)
    assert (after.capabilities, after.capabilities_at) == (
        before.capabilities,
        before.capabilities_at,
    )


def test_async_work_goes_only_to_eligible_devices(
    coordinator: Coordinator, fleet: Fleet, db: Db
) -> None:
    task_id = create_task(
        coordinator,
        aggregation={"mode": "async", "buffer_size": 1, "num_rounds": 3},
        requirements={"trainer": "mlp"},
    )
    db.wait_round(task_id, 1)
    decliner, worker, unable = fleet
    for device in (decliner, worker):
        assert device.report(trainers=["softmax", "mlp"]).status_code == 200
    assert unable.report(trainers=["softmax"]).status_code == 200
    assert unable.work(wait=1) is None
    work = decliner.work(wait=0)
    assert work is not None and work["task_id"] == task_id
    assert decliner.decline(work["assignment_id"], "training_failed").status_code == 200
    # The next version's work goes to the others, not to the device that declined the task ...
    upload(worker, worker.work(wait=0), 3)
    db.wait_round(task_id, 2)
    assert decliner.work(wait=1) is None
    assert unable.work(wait=0) is None
    # ... until it reports its capabilities again.
    assert decliner.report(trainers=["mlp"]).status_code == 200
    again = decliner.work(wait=0)
    assert again is not None and again["round_id"] != work["round_id"]


def test_a_drafts_requirements_are_replaced_as_a_whole_and_checked(
    coordinator: Coordinator,
) -> None:
    task_id = create_task(
        coordinator, aggregation=every_device(1), requirements={"tags": ["a"]}, start=False
    )
    with coordinator.admin() as admin:
        url = f"{API}/tasks/{task_id}"
        r = admin.patch(url, json={"requirements": {"trainer": "mlp", "min_examples": 10}})
        assert r.status_code == 200, r.text
        expected = {
            "tags": [],
            "trainer": "mlp",
            "feature_shape": None,
            "label_kind": None,
            "min_examples": 10,
        }
        assert r.json()["requirements"] == expected
        for bad in ({"tags": ["a b"]}, {"feature_shape": [-1]}, {"gpu": True}, {"min_examples": 0}):
            refused = admin.patch(url, json={"requirements": bad})
            assert refused.status_code == 422 and set(refused.json()) == {"error", "detail"}
        assert admin.get(url).json()["requirements"] == expected
        assert admin.post(f"{url}/start").status_code == 200
        late = admin.patch(url, json={"requirements": {}})
        assert (late.status_code, late.json()["error"]) == (409, "task_not_draft")


def test_a_decline_of_work_cancelled_meanwhile_is_kept_and_the_task_not_offered_again(
    coordinator: Coordinator, fleet: Fleet, db: Db
) -> None:
    """Three devices picked for two updates: the two fast ones close the round and the third
    one's assignment is cancelled while it was finding out it cannot do the task. Its decline
    is still kept and counted (eligibility then leaves the device out of the task, as for any
    decline: test_eligibility.py)."""
    task_id = create_task(
        coordinator,
        aggregation={
            "clients_per_round": 2,
            "over_selection": 0.5,
            "min_updates": 2,
            "round_deadline_s": 600,
            "num_rounds": 3,
        },
    )
    slow, *fast = working(db, task_id, 3)
    for seed, assignment in enumerate(fast):
        device = fleet.by_id(assignment.device_id)
        work = device.work(wait=0)
        assert work is not None and work["assignment_id"] == assignment.id
        upload(device, work, seed)
    decliner = fleet.by_id(slow.device_id)
    # Until the scheduler has closed the round the poll answers nothing (204: None).
    wait_until(lambda: (decliner.work(wait=0, current=slow.id) or {}).get("status") == "cancelled")
    r = decliner.decline(slow.id, "data_mismatch", "X must have shape [n, 64]")
    assert r.status_code == 200, r.text
    assert r.json()["reason"] == "data_mismatch" and r.json()["round_number"] == 1
    (ended,) = [a for a in db.assignments(task_id) if a.id == slow.id]
    assert ended.status == AssignmentStatus.CANCELLED and ended.decline_reason == "data_mismatch"
    assert db.device(slow.device_id).num_declined == 1
    assert db.round(task_id, 1).num_declined == 1  # type: ignore[union-attr]

    with coordinator.viewer() as viewer:
        listed = viewer.get(f"{API}/devices/{slow.device_id}/declines").json()
    assert [d["assignment_id"] for d in listed["items"]] == [slow.id]
    # Uploaded work cannot be declined.
    done = fleet.by_id(fast[0].device_id).decline(fast[0].id, "other")
    assert (done.status_code, done.json()["error"]) == (409, "assignment_ended")
