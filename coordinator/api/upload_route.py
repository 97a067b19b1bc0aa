"""The update upload served without FastAPI's parameter machinery when it is well-formed.

``POST /api/v1/device/assignments/{assignment_id}/update`` is the hot route of a running
task: every accepted update is one. FastAPI's dependency solving and parameter validation
around it (the signed-request dependency, the runtime, the path, header and query parameters)
cost more CPU than the route's own checks. :class:`UploadRoute` sits in front of the FastAPI
route (:func:`fedge.coordinator.api.device_work.upload_update`, which still documents the
route in the OpenAPI schema) and takes a request only when every parameter is one the FastAPI
route would accept unchanged:

- the assignment id is 1 to 10 decimal digits with a value in ``1..MAX_ID``;
- the query holds only ``next`` (``0``, ``1``, ``true`` or ``false``), ``known`` and ``have``
  (matching their documented patterns), each at most once.

Anything else (an id out of range, a malformed, repeated or unknown query parameter, another
method) is not matched here, and the FastAPI route answers it as before, with its 422 or 405.
A matched request runs the same steps in the same order: the signed-request checks of
``DeviceClaimDep`` (:func:`fedge.coordinator.auth.authenticate_device_deferred`, the same
function), then :func:`fedge.coordinator.api.device_work.upload_response`, the answer sent
while the device's request slot is still held. Errors are raised as the FastAPI route raises
them and answered by the same exception handlers.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.requests import Request
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from fedge.coordinator.api.deps import MAX_ID
from fedge.coordinator.api.device_work import HAVE_PATTERN, KNOWN_PATTERN, upload_response
from fedge.coordinator.auth import authenticate_device_deferred
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.runtime import Runtime

#: The route's path template (as the FastAPI route and the metrics label name it).
UPLOAD_PATH = f"{DEVICE_PREFIX}/assignments/{{assignment_id}}/update"
_PATH = re.compile(rf"^{re.escape(DEVICE_PREFIX)}/assignments/([0-9]{{1,10}})/update$")
_BOOLS = {"0": False, "1": True, "false": False, "true": True}
_KNOWN = re.compile(KNOWN_PATTERN)
_HAVE = re.compile(HAVE_PATTERN)
_deferred = asynccontextmanager(authenticate_device_deferred)


def _query(raw: bytes) -> dict[str, Any] | None:
    """The upload's query parameters when all are well-formed and known; None otherwise
    (the FastAPI route then answers the request)."""
    params: dict[str, Any] = {"next_work": False, "known": None, "have": None}
    if not raw:
        return params
    seen: set[str] = set()
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return None
        seen.add(name)
        if name == "next" and value in _BOOLS:
            params["next_work"] = _BOOLS[value]
        elif name == "known" and _KNOWN.match(value):
            params["known"] = value
        elif name == "have" and _HAVE.match(value):
            params["have"] = value
        else:
            return None
    return params


class UploadRoute(BaseRoute):
    """The direct route of the upload (see the module docstring)."""

    path = UPLOAD_PATH

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "POST":
            return Match.NONE, {}
        found = _PATH.match(scope["path"])
        if found is None or scope.get("root_path"):
            return Match.NONE, {}
        assignment_id = int(found.group(1))
        if not 1 <= assignment_id <= MAX_ID:
            return Match.NONE, {}
        params = _query(scope.get("query_string", b""))
        if params is None:
            return Match.NONE, {}
        return Match.FULL, {
            "path_params": {"assignment_id": found.group(1)},
            "fedge.upload": (assignment_id, params),
        }

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        assignment_id, params = scope["fedge.upload"]
        request = Request(scope, receive)
        runtime: Runtime = request.app.state.runtime
        headers = request.headers
        async with _deferred(request) as device:
            response = await upload_response(
                runtime,
                device,
                assignment_id,
                idempotency_key=headers.get("idempotency-key"),
                prefer=headers.get("prefer"),
                **params,
            )
            await response(scope, receive, send)


def install_upload_route(app: FastAPI) -> None:
    """Put :class:`UploadRoute` in front of every other route of ``app``."""
    app.router.routes.insert(0, UploadRoute())
