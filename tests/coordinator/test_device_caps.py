"""One device cannot take the coordinator for itself.

A device that opened more work long-polls than ``max_connections`` used to make every other
caller, ``/healthz`` and the admin API included, get 503 until its polls ended; and a client
naming a device that is not enrolled had its body read (up to ``max_upload_bytes``) before
the device was looked up. Now each device has a cap on its requests in flight and on its
long-polls (429 ``too_many_requests`` beyond them), and the device is looked up before its
body is read.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.coordinator.auth import DeviceSlots, get_device_slots
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.coordinator.test_overload import IN_FLIGHT, RESERVED, THREADS, RawRequest
from tests.support.device import API, SignedDevice
from tests.support.rounds import wait_until

MAX_IN_FLIGHT = 3
MAX_LONG_POLLS = 2
WORK = f"{API}/device/work"
ME = f"{API}/device/me"
UPLOAD = f"{API}/device/assignments/1/update"
#: A client's patience for answers that must come at once (a held poll waits 30 s).
PROMPT = httpx.Timeout(10.0, read=5.0)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "worker_threads": THREADS,
            "max_connections": IN_FLIGHT,
            "reserved_connections": RESERVED,
            "device_max_in_flight": MAX_IN_FLIGHT,
            "device_max_long_polls": MAX_LONG_POLLS,
        }
    )


@pytest.fixture
def devices(coordinator: Coordinator) -> Iterator[tuple[SignedDevice, SignedDevice]]:
    first = SignedDevice.enroll(coordinator, name="greedy")
    second = SignedDevice.enroll(coordinator, name="other")
    yield first, second
    first.close()
    second.close()


def slots(coordinator: Coordinator) -> DeviceSlots:
    return get_device_slots(coordinator.app.state.runtime)


def held_poll(coordinator: Coordinator, device: SignedDevice) -> RawRequest:
    """A long-poll of ``device`` sent on a connection of its own and left waiting."""
    return RawRequest.of(coordinator, device.build("GET", WORK, params={"wait": 30})).send_all()


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": code, "detail": response.json()["detail"]}
    assert int(response.headers["retry-after"]) >= 1


def prompt_get(device: SignedDevice, path: str, **params: int) -> httpx.Response:
    request = device.build("GET", path, params=params or None)
    request.extensions["timeout"] = PROMPT.as_dict()
    return device.send(request)


def test_long_polls_beyond_a_devices_cap_are_refused_while_others_are_served(
    coordinator: Coordinator, devices: tuple[SignedDevice, SignedDevice]
) -> None:
    greedy, other = devices
    notifier = coordinator.app.state.runtime.notifier
    held = [held_poll(coordinator, greedy) for _ in range(MAX_LONG_POLLS)]
    try:
        wait_until(lambda: notifier.waiting(greedy.device_id) == MAX_LONG_POLLS)
        # As many more as would fill every slot there is: each is refused at once.
        for _ in range(IN_FLIGHT):
            assert_refused(prompt_get(greedy, WORK, wait=30), 429, "too_many_requests")
        assert notifier.waiting(greedy.device_id) == MAX_LONG_POLLS
        # Its polls fill the device's share; it may still make other requests, ...
        assert prompt_get(greedy, ME).status_code == 200
        # ... and everyone else is served: another device's poll, probes, administrators.
        assert prompt_get(other, WORK, wait=1).status_code == 204
        with coordinator.client() as anonymous:
            assert anonymous.get("/healthz", timeout=PROMPT).status_code == 200
        with coordinator.viewer() as viewer:
            assert viewer.get(f"{API}/tasks", timeout=PROMPT).status_code == 200
    finally:
        for poll in held:
            poll.close()
    # A poll whose client went away gives its slot back.
    wait_until(lambda: slots(coordinator).long_polls(greedy.device_id) == 0)
    assert prompt_get(greedy, WORK, wait=1).status_code == 204


def test_requests_beyond_a_devices_cap_are_refused_before_their_body_is_read(
    coordinator: Coordinator, devices: tuple[SignedDevice, SignedDevice]
) -> None:
    greedy, other = devices
    body = bytes(4096)

    def upload() -> RawRequest:
        """An upload whose head is sent and whose body is not (yet)."""
        request = greedy.build("POST", UPLOAD, content=body, headers={"Idempotency-Key": "k"})
        return RawRequest.of(coordinator, request).send_head()

    held = [upload() for _ in range(MAX_IN_FLIGHT)]
    try:
        wait_until(lambda: slots(coordinator).in_flight(greedy.device_id) == MAX_IN_FLIGHT)
        assert_refused(prompt_get(greedy, ME), 429, "too_many_requests")
        with upload() as extra:  # answered although its body was never sent
            assert_refused(extra.response(), 429, "too_many_requests")
        assert prompt_get(other, ME).status_code == 200
    finally:
        for request in held:
            request.close()
    wait_until(lambda: slots(coordinator).in_flight(greedy.device_id) == 0)
    assert prompt_get(greedy, ME).status_code == 200


@pytest.mark.parametrize("who", ["unknown", "revoked"])
def test_a_device_that_is_not_enrolled_or_revoked_is_refused_before_its_body_is_read(
    coordinator: Coordinator, devices: tuple[SignedDevice, SignedDevice], who: str
) -> None:
    greedy, _ = devices
    if who == "revoked":
        with coordinator.admin() as admin:
            admin.post(f"{API}/devices/{greedy.device_id}/revoke").raise_for_status()
        sender = greedy
        expected = (403, "device_revoked")
    else:
        sender = SignedDevice(coordinator.url, coordinator.ca_file, device_id="made-up-device")
        expected = (401, "unknown_device")
    # A declared body of a megabyte, of which not one byte is sent: the answer can only come
    # if the coordinator does not wait for the body.
    request = sender.build("POST", UPLOAD, content=bytes(1 << 20))
    with RawRequest.of(coordinator, request).send_head() as raw:
        response = raw.response()
    assert response.status_code == expected[0], response.text
    assert response.json() == {"error": expected[1], "detail": response.json()["detail"]}
    assert slots(coordinator).in_flight(sender.device_id) == 0


def test_a_forged_request_gives_its_slot_back_at_once(
    coordinator: Coordinator, devices: tuple[SignedDevice, SignedDevice]
) -> None:
    """A forger naming an enrolled device holds one of its slots only until it fails."""
    victim, _ = devices
    for _ in range(2 * MAX_IN_FLIGHT):
        r = victim.post(UPLOAD, content=bytes(100), key=Ed25519PrivateKey.generate())
        assert (r.status_code, r.json()["error"]) == (401, "invalid_signature")
        assert slots(coordinator).in_flight(victim.device_id) == 0
    assert victim.get(ME).status_code == 200
