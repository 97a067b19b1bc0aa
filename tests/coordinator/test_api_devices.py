"""Devices through the admin API (list, filter, detail, revoke) and the device's model
download (only for tasks it has an assignment for)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from fedge.coordinator.app import create_app
from fedge.coordinator.models import Assignment, UsedNonce
from tests.coordinator.conftest import Coordinator, make_key
from tests.support.device import API, SignedDevice
from tests.support.rows import add_assignment, db_session
from tests.support.servers import serve_in_thread

SOFTMAX = {"architecture": "softmax", "input_dim": 4, "num_classes": 2}


def _statuses(settings, ids):
    with db_session(settings) as s:
        rows = s.execute(select(Assignment.id, Assignment.status).where(Assignment.id.in_(ids)))
        return dict(rows.all())


def _task(coordinator) -> int:
    with coordinator.admin() as admin:
        r = admin.post(f"{API}/tasks", json={"name": "d", "model": SOFTMAX})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


def test_list_filter_detail_and_revoke(coordinator):
    devices = [SignedDevice.enroll(coordinator, name=f"dev-{i}") for i in range(3)]
    try:
        ids = [d.device_id for d in devices]
        with coordinator.admin() as admin:
            page = admin.get(f"{API}/devices").json()
            assert [d["device_id"] for d in page["items"]] == ids and page["total"] == 3
            r = admin.post(f"{API}/devices/{ids[1]}/revoke")
            assert r.status_code == 200 and r.json()["revoked_at"] is not None
            again = admin.post(f"{API}/devices/{ids[1]}/revoke").json()
            assert again["revoked_at"] == r.json()["revoked_at"]  # idempotent
            revoked = admin.get(f"{API}/devices", params={"status": "revoked"}).json()
            assert [d["device_id"] for d in revoked["items"]] == [ids[1]]
            active = admin.get(f"{API}/devices", params={"status": "active", "limit": 1}).json()
            assert [d["device_id"] for d in active["items"]] == [ids[0]]
            assert active["total"] == 2
            detail = admin.get(f"{API}/devices/{ids[2]}").json()
            assert detail["name"] == "dev-2" and detail["status"] == "active"
            assert detail["public_key"] == devices[2].public_key_b64
            for r in (admin.get(f"{API}/devices/nope"), admin.post(f"{API}/devices/nope/revoke")):
                assert r.status_code == 404 and r.json()["error"] == "not_found"
            assert admin.get(f"{API}/devices/not%20an%20id").status_code == 422
        with coordinator.viewer() as viewer:
            assert viewer.get(f"{API}/devices/{ids[0]}").status_code == 200
            r = viewer.post(f"{API}/devices/{ids[0]}/revoke")
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert devices[0].get(f"{API}/device/me").status_code == 200
    finally:
        for d in devices:
            d.close()


def test_revoke_cancels_active_assignments_only(coordinator):
    task_id = _task(coordinator)
    with SignedDevice.enroll(coordinator) as device, SignedDevice.enroll(coordinator) as other:
        settings = coordinator.settings
        active = add_assignment(settings, task_id=task_id, device_id=device.device_id)
        downloaded = add_assignment(
            settings,
            task_id=task_id,
            device_id=device.device_id,
            round_number=2,
            status="downloaded",
        )
        uploaded = add_assignment(
            settings,
            task_id=task_id,
            device_id=device.device_id,
            round_number=3,
            status="uploaded",
        )
        others = add_assignment(settings, task_id=task_id, device_id=other.device_id)
        with coordinator.admin() as admin:
            assert admin.post(f"{API}/devices/{device.device_id}/revoke").status_code == 200
        assert _statuses(settings, [active, downloaded, uploaded, others]) == {
            active: "cancelled",
            downloaded: "cancelled",
            uploaded: "uploaded",
            others: "assigned",
        }
        r = device.get(f"{API}/device/tasks/{task_id}/models/0")
        assert r.status_code == 403 and r.json()["error"] == "device_revoked"


def test_model_download_needs_an_assignment_for_the_task(coordinator):
    task_id = _task(coordinator)
    other_task = _task(coordinator)
    with SignedDevice.enroll(coordinator) as device, SignedDevice.enroll(coordinator) as stranger:
        settings = coordinator.settings
        assignment = add_assignment(settings, task_id=task_id, device_id=device.device_id)
        add_assignment(settings, task_id=other_task, device_id=stranger.device_id)
        path = f"{API}/device/tasks/{task_id}/models/0"
        # A device with an assignment elsewhere cannot read this task's model.
        r = stranger.get(path)
        assert r.status_code == 403 and r.json()["error"] == "not_your_assignment"
        r = stranger.get(f"{API}/device/tasks/9999/models/0")
        assert r.status_code == 403 and r.json()["error"] == "not_your_assignment"
        assert _statuses(settings, [assignment]) == {assignment: "assigned"}
        with coordinator.admin() as admin:
            expected = admin.get(f"{API}/tasks/{task_id}/models/0")
        r = device.get(path)
        assert r.status_code == 200
        assert r.content == expected.content
        assert r.headers["ETag"] == expected.headers["ETag"]
        assert _statuses(settings, [assignment]) == {assignment: "downloaded"}
        r = device.get(path, headers={"If-None-Match": expected.headers["ETag"]})
        assert r.status_code == 304 and r.content == b""
        assert device.get(f"{API}/device/tasks/{task_id}/models/latest").status_code == 200
        r = device.get(f"{API}/device/tasks/{task_id}/models/5")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        half = device.get(path, params={"dtype": "f16"})
        assert half.status_code == 200 and len(half.content) < len(expected.content)


def test_download_marks_only_the_assignment_on_that_version(coordinator):
    task_id = _task(coordinator)
    with SignedDevice.enroll(coordinator) as device:
        settings = coordinator.settings
        on_v0 = add_assignment(settings, task_id=task_id, device_id=device.device_id)
        on_v1 = add_assignment(
            settings, task_id=task_id, device_id=device.device_id, round_number=2, base_version=1
        )
        assert device.get(f"{API}/device/tasks/{task_id}/models/0").status_code == 200
        assert _statuses(settings, [on_v0, on_v1]) == {on_v0: "downloaded", on_v1: "assigned"}


@pytest.fixture
def slow_recheck(settings, tls_paths):
    """A coordinator whose long-polls re-check the database only once a minute, so a prompt
    answer can only come from the in-process wake-up."""
    cfg = settings.model_copy(update={"long_poll_recheck_s": 60.0})
    app = create_app(cfg)
    admin_key, viewer_key = make_key(cfg, "admin"), make_key(cfg, "viewer")
    with serve_in_thread(app, certfile=cfg.tls_cert, keyfile=cfg.tls_key) as url:
        yield Coordinator(url, cfg, app, tls_paths.ca_cert, admin_key, viewer_key)


def _nonces(coordinator: Coordinator, device_id: str) -> int:
    with db_session(coordinator.settings) as s:
        return len(s.scalars(select(UsedNonce.nonce).where(UsedNonce.device_id == device_id)).all())


def test_revocation_wakes_the_devices_long_poll(slow_recheck):
    coordinator = slow_recheck
    task_id = _task(coordinator)
    with SignedDevice.enroll(coordinator) as device:
        assignment = add_assignment(
            coordinator.settings, task_id=task_id, device_id=device.device_id
        )
        nonces = _nonces(coordinator, device.device_id)
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            poll = pool.submit(
                device.get, f"{API}/device/work", params={"wait": 30, "current": assignment}
            )
            deadline = time.monotonic() + 10
            notifier = coordinator.app.state.runtime.notifier
            # The poll is waiting once it subscribed and its first check committed (its nonce
            # recorded): a revocation before that commit is the answer to the request itself
            # (403 device_revoked), not news for a waiting poll.
            while (
                notifier.waiting(device.device_id) == 0
                or _nonces(coordinator, device.device_id) == nonces
            ):
                assert time.monotonic() < deadline and not poll.done(), "poll did not wait"
                time.sleep(0.02)
            with coordinator.admin() as admin:
                assert admin.post(f"{API}/devices/{device.device_id}/revoke").status_code == 200
            r = poll.result(timeout=20)
            elapsed = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json()["assignment_id"] == assignment
        assert r.json()["status"] == "cancelled"
        assert elapsed < 15
