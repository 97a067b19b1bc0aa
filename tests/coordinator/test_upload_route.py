"""The upload's direct route (:mod:`fedge.coordinator.api.upload_route`) takes exactly the
well-formed requests and leaves every other one to the FastAPI route."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Match

from fedge.coordinator.api.deps import MAX_ID
from fedge.coordinator.api.upload_route import UPLOAD_PATH, UploadRoute
from fedge.coordinator.app import create_app
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.settings import Settings
from tests.support.device import http_scope


def _scope(path: str, query: str = "", method: str = "POST") -> dict[str, Any]:
    return http_scope(path, query, method)


def _upload(assignment: str) -> str:
    return f"{DEVICE_PREFIX}/assignments/{assignment}/update"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"next_work": False, "known": None, "have": None}),
        ("next=1", {"next_work": True, "known": None, "have": None}),
        (
            "next=false&known=0123456789abcdef",
            {"next_work": False, "known": "0123456789abcdef", "have": None},
        ),
        ("next=true&have=3.12", {"next_work": True, "known": None, "have": "3.12"}),
    ],
)
def test_well_formed_uploads_are_taken(query: str, expected: dict[str, Any]) -> None:
    match, child = UploadRoute().matches(_scope(_upload("42"), query))
    assert match is Match.FULL
    assert child["path_params"] == {"assignment_id": "42"}
    assert child["fedge.direct"] == (42, expected)


@pytest.mark.parametrize(
    ("path", "query", "method"),
    [
        (_upload("0"), "", "POST"),  # below 1: FastAPI's 422
        (_upload(str(MAX_ID + 1)), "", "POST"),  # above the largest id
        (_upload("12345678901"), "", "POST"),
        (_upload("abc"), "", "POST"),
        (_upload("42"), "", "GET"),  # FastAPI's 405
        (_upload("42") + "/", "", "POST"),
        (_upload("42"), "next=maybe", "POST"),
        (_upload("42"), "next=1&next=0", "POST"),  # repeated
        (_upload("42"), "known=XYZ", "POST"),
        (_upload("42"), "have=3", "POST"),
        (_upload("42"), "other=1", "POST"),
        (_upload("42"), "next=", "POST"),
    ],
)
def test_everything_else_is_left_to_the_fastapi_route(path: str, query: str, method: str) -> None:
    match, _ = UploadRoute().matches(_scope(path, query, method))
    assert match is Match.NONE


def test_the_app_serves_uploads_through_it_and_still_documents_the_route(
    settings: Settings,
) -> None:
    app = create_app(settings)
    assert isinstance(app.router.routes[0], UploadRoute)
    documented = app.openapi()["paths"][UPLOAD_PATH]["post"]
    assert documented["requestBody"]["content"]["application/octet-stream"]
    assert {"201", "422"} <= set(documented["responses"])
