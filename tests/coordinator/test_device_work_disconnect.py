"""A long-poll whose device went away ends instead of re-checking until its wait is over."""

from __future__ import annotations

import httpx
import pytest

from tests.coordinator.conftest import Coordinator
from tests.support.device import API, SignedDevice
from tests.support.rounds import wait_until

WAIT = 30


def test_a_disconnected_long_poll_stops_waiting(coordinator: Coordinator) -> None:
    notifier = coordinator.app.state.runtime.notifier
    with SignedDevice.enroll(coordinator) as device:
        request = device.build("GET", f"{API}/device/work", params={"wait": WAIT})
        request.extensions["timeout"] = httpx.Timeout(5.0, read=1.0).as_dict()
        # The client gives up after a second and closes its connection.
        with pytest.raises(httpx.ReadTimeout):
            device.send(request)
        device.client.close()
        # The server notices within a re-check period, far sooner than the 30 s wait.
        wait_until(lambda: notifier.waiting(device.device_id) == 0, timeout=WAIT / 3)
