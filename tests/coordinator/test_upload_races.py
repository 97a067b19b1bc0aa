"""Uploads racing each other and the scheduler on one assignment.

Concurrent requests go out from one thread each, each with its own HTTPS connection, released
together by a barrier, so they really are in flight at the same time."""

from __future__ import annotations

import ssl
import threading

import httpx
import numpy as np
import pytest

from tests.coordinator.conftest import Coordinator
from tests.support.rounds import (
    Db,
    TestDevice,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

PARALLEL = 8


def _in_parallel(coordinator: Coordinator, requests: list[httpx.Request]) -> list[httpx.Response]:
    """Send each request from its own thread and connection, all released at once."""
    barrier = threading.Barrier(len(requests), timeout=60)
    responses: list[httpx.Response | BaseException | None] = [None] * len(requests)

    def send(i: int) -> None:
        context = ssl.create_default_context(cafile=str(coordinator.ca_file))
        with httpx.Client(verify=context, timeout=60) as client:
            client.get(f"{coordinator.url}/healthz")  # connect before the barrier
            barrier.wait()
            try:
                responses[i] = client.send(requests[i])
            except BaseException as exc:  # reported below
                responses[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a request did not finish within 120 s"
    out: list[httpx.Response] = []
    for r in responses:
        assert isinstance(r, httpx.Response), r
        out.append(r)
    return out


def _assigned(coordinator: Coordinator, fleet: list[TestDevice]) -> tuple[int, dict]:
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
    return task_id, work


@pytest.mark.parametrize("same_key", [True, False], ids=["same-key", "fresh-keys"])
def test_concurrent_uploads_for_one_assignment_store_one_update(
    coordinator: Coordinator, db: Db, same_key: bool
) -> None:
    with fleet_of(coordinator, 1) as fleet:
        task_id, work = _assigned(coordinator, fleet)
        delta = random_delta(spec_of(work), np.random.default_rng(3))
        body = make_update(work, delta=delta, num_examples=5)
        device = fleet[0]
        requests = [
            device.build(
                "POST",
                work["upload_url"],
                content=body,
                headers={"Idempotency-Key": "same" if same_key else f"key-{i}"},
            )
            for i in range(PARALLEL)
        ]
        responses = _in_parallel(coordinator, requests)
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 1, [(r.status_code, r.text) for r in responses]
    if same_key:
        assert codes == [200] * (PARALLEL - 1) + [201], [(r.status_code, r.text) for r in responses]
        first = next(r for r in responses if r.status_code == 201).json()
        for r in responses:
            assert {**r.json(), "duplicate": False} == first
    else:
        assert codes == [201] + [409] * (PARALLEL - 1)
        for r in responses:
            if r.status_code == 409:
                assert r.json()["error"] == "already_uploaded", r.text
    updates = db.updates(task_id)
    assert len(updates) == 1
    assert [a.status for a in db.assignments(task_id)] == ["uploaded"]
