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
method) is not matched here, and the FastAPI route answers it as before, with its 422 or 405
(:class:`fedge.coordinator.api.direct.DirectRoute`).
A matched request runs the same steps in the same order: the signed-request checks of
``DeviceClaimDep`` (:func:`fedge.coordinator.auth.authenticate_device_deferred`, the same
function), then :func:`fedge.coordinator.api.device_work.upload_response`, the answer sent
while the device's request slot is still held. Errors are raised as the FastAPI route raises
them and answered by the same exception handlers.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from fedge.coordinator.api.device_work import HAVE_PATTERN, KNOWN_PATTERN, upload_response
from fedge.coordinator.api.direct import BOOLS, DirectRoute, matching
from fedge.coordinator.auth import authenticate_device_deferred
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.runtime import Runtime

#: The route's path template (as the FastAPI route and the metrics label name it).
UPLOAD_PATH = f"{DEVICE_PREFIX}/assignments/{{assignment_id}}/update"
deferred = asynccontextmanager(authenticate_device_deferred)


class UploadRoute(DirectRoute):
    """The direct route of the upload (see the module docstring)."""

    path = UPLOAD_PATH
    method = "POST"
    regex = re.compile(
        rf"^{re.escape(DEVICE_PREFIX)}/assignments/(?P<assignment_id>[0-9]{{1,10}})/update$"
    )
    query_spec = {
        "next": ("next_work", BOOLS),
        "known": ("known", matching(KNOWN_PATTERN)),
        "have": ("have", matching(HAVE_PATTERN)),
    }
    query_defaults = {"next_work": False, "known": None, "have": None}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        assignment_id, params = scope["fedge.direct"]
        request = Request(scope, receive)
        runtime: Runtime = request.app.state.runtime
        headers = request.headers
        async with deferred(request) as device:
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
