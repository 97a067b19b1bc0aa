"""The work poll's direct route (:mod:`fedge.coordinator.api.work_route`) takes exactly the
well-formed polls, leaves every other one to the FastAPI route, and answers what the FastAPI
route answers: same status, same bytes, same refusals (served over HTTPS, one coordinator,
with and without the direct route in front)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from starlette.routing import Match

from fedge.coordinator.api import work_route
from fedge.coordinator.api.deps import MAX_ID
from fedge.coordinator.api.work_route import WORK_PATH, WorkRoute
from fedge.coordinator.app import create_app
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.device import API, http_scope
from tests.support.rounds import create_task, fleet_of

ASYNC = {"mode": "async", "buffer_size": 2, "max_concurrency": 4, "num_rounds": 10}


def _scope(query: str = "", method: str = "GET", path: str = WORK_PATH) -> dict[str, Any]:
    return http_scope(path, query, method)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"wait": 0, "current": None, "known": None, "have": None}),
        ("wait=20", {"wait": 20, "current": None, "known": None, "have": None}),
        ("wait=60&current=7", {"wait": 60, "current": 7, "known": None, "have": None}),
        (
            "known=0123456789abcdef&have=3.12",
            {"wait": 0, "current": None, "known": "0123456789abcdef", "have": "3.12"},
        ),
    ],
)
def test_well_formed_polls_are_taken(query: str, expected: dict[str, Any]) -> None:
    match, child = WorkRoute(None).matches(_scope(query))  # type: ignore[arg-type]
    assert match is Match.FULL
    assert child["fedge.direct"] == (None, expected)


@pytest.mark.parametrize(
    ("query", "method", "path"),
    [
        ("wait=61", "GET", WORK_PATH),  # FastAPI's 422
        ("wait=-1", "GET", WORK_PATH),
        ("wait=+5", "GET", WORK_PATH),
        ("wait=", "GET", WORK_PATH),
        ("current=0", "GET", WORK_PATH),
        (f"current={MAX_ID + 1}", "GET", WORK_PATH),
        ("wait=1&wait=2", "GET", WORK_PATH),  # repeated
        ("known=XYZ", "GET", WORK_PATH),
        ("have=3", "GET", WORK_PATH),
        ("other=1", "GET", WORK_PATH),
        ("", "POST", WORK_PATH),  # FastAPI's 405
        ("", "GET", WORK_PATH + "/"),
    ],
)
def test_everything_else_is_left_to_the_fastapi_route(query: str, method: str, path: str) -> None:
    match, _ = WorkRoute(None).matches(_scope(query, method, path))  # type: ignore[arg-type]
    assert match is Match.NONE


def test_the_app_serves_polls_through_it_and_still_documents_the_route(
    settings: Settings,
) -> None:
    app = create_app(settings)
    assert any(isinstance(route, WorkRoute) for route in app.router.routes[:2])
    documented = app.openapi()["paths"][WORK_PATH]["get"]
    assert {"200", "204", "422"} <= set(documented["responses"])


@contextmanager
def _without_direct_route(coordinator: Coordinator) -> Iterator[None]:
    routes = coordinator.app.router.routes
    direct = next(route for route in routes if isinstance(route, WorkRoute))
    routes.remove(direct)
    try:
        yield
    finally:
        routes.insert(0, direct)


def test_answers_match_the_fastapi_route(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[dict[str, Any]] = []
    handler = work_route.work

    async def counted(*args: Any, **kwargs: Any) -> Any:
        served.append(kwargs)
        return await handler(*args, **kwargs)

    monkeypatch.setattr(work_route, "work", counted)
    with fleet_of(coordinator, 1) as fleet:
        device = fleet[0]
        path = f"{API}/device/work"

        def both(params: dict[str, Any]) -> tuple[Any, Any]:
            before = len(served)
            direct = device.get(path, params=params)
            assert len(served) == before + 1  # the direct route answered
            with _without_direct_route(coordinator):
                fastapi = device.get(path, params=params)
            assert len(served) == before + 1  # the FastAPI route answered
            return direct, fastapi

        # Nothing to do yet: 204 from both.
        direct, fastapi = both({"wait": 0})
        assert direct.status_code == fastapi.status_code == 204
        assert direct.content == fastapi.content == b""
        task_id = create_task(coordinator, aggregation=ASYNC)
        # The scheduler opens the task's round: a long-poll takes the assignment when it does.
        assert device.get(path, params={"wait": 30}).status_code == 200
        # The assignment (each poll finds the same active one): the same bytes.
        direct, fastapi = both({"wait": 0})
        assert direct.status_code == fastapi.status_code == 200
        assert direct.headers["content-type"] == fastapi.headers["content-type"]
        assert direct.content == fastapi.content
        work = direct.json()
        assert work["task_id"] == task_id and "compression" in work
        # With the configuration the device holds: left out by both.
        known = {"wait": 0, "known": work["config_digest"]}
        direct, fastapi = both(known)
        assert direct.content == fastapi.content
        assert "compression" not in direct.json() and direct.json()["task_id"] == task_id
        # The current assignment is not cancelled: nothing within the wait.
        direct, fastapi = both({"wait": 0, "current": work["assignment_id"]})
        assert direct.status_code == fastapi.status_code == 204
        # An assignment that is not the device's: the same refusal.
        direct, fastapi = both({"wait": 0, "current": work["assignment_id"] + 1000})
        assert direct.status_code == fastapi.status_code
        assert direct.json() == fastapi.json()
        assert direct.status_code >= 400
        # A replayed poll is refused by both alike (the nonce was used by the first).
        request = device.build("GET", path, params={"wait": 0})
        assert device.send(request).status_code == 200
        replay_direct = device.send(request)
        with _without_direct_route(coordinator):
            replay_fastapi = device.send(request)
        assert replay_direct.status_code == replay_fastapi.status_code == 401
        assert replay_direct.json() == replay_fastapi.json()
        # A malformed poll goes to the FastAPI route: its 422.
        before = len(served)
        bad = device.get(path, params={"wait": 61})
        assert bad.status_code == 422 and bad.json()["error"]
        assert len(served) == before
