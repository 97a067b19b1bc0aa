"""The work poll served without FastAPI's parameter machinery when it is well-formed.

``GET /api/v1/device/work`` is a device's other frequent request: the long-poll for work
(and, with ``current``, for the cancellation of its assignment). :class:`WorkRoute` sits in
front of the FastAPI route (:func:`fedge.coordinator.api.device_work.work`, which still
documents the route) and takes a request only when every query parameter is one the FastAPI
route would accept unchanged (:class:`fedge.coordinator.api.direct.DirectRoute`):

- ``wait``: decimal digits, ``0..60``; ``current``: decimal digits, ``1..MAX_ID``;
- ``known`` and ``have``: matching their documented patterns;
- each at most once, nothing else.

A matched request runs the same steps in the same order: the signed-request checks of
``DeviceClaimDep`` (the same function), then the FastAPI route's own handler function with the
parsed parameters; a dict it returns is validated and serialized with the FastAPI route's own
response field (``response_model_exclude_none``), as FastAPI does, and the answer is sent while
the device's request slot is still held. Errors are raised as the FastAPI route raises them
and answered by the same exception handlers.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.routing import APIRoute, serialize_response
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fedge.coordinator.api import device_work
from fedge.coordinator.api.deps import MAX_ID
from fedge.coordinator.api.device_work import HAVE_PATTERN, KNOWN_PATTERN, work
from fedge.coordinator.api.direct import DirectRoute, int_in, matching
from fedge.coordinator.api.upload_route import deferred
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.runtime import Runtime

#: The route's path (as the FastAPI route and the metrics label name it).
WORK_PATH = f"{DEVICE_PREFIX}/work"


class WorkRoute(DirectRoute):
    """The direct route of the work poll (see the module docstring); ``fastapi_route`` is
    the FastAPI route it stands in front of (its response field serializes the answers)."""

    path = WORK_PATH
    method = "GET"
    regex = re.compile(rf"^{re.escape(WORK_PATH)}$")
    query_spec = {
        "wait": ("wait", int_in(0, 60)),
        "current": ("current", int_in(1, MAX_ID)),
        "known": ("known", matching(KNOWN_PATTERN)),
        "have": ("have", matching(HAVE_PATTERN)),
    }
    query_defaults = {"wait": 0, "current": None, "known": None, "have": None}

    def __init__(self, fastapi_route: APIRoute) -> None:
        self.fastapi_route = fastapi_route

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        _, params = scope["fedge.direct"]
        request = Request(scope, receive)
        runtime: Runtime = request.app.state.runtime
        async with deferred(request) as device:
            found = await work(request, device, runtime, **params)
            response = found if isinstance(found, Response) else await self._answer(found)
            await response(scope, receive, send)

    async def _answer(self, found: object) -> Response:
        route = self.fastapi_route
        content = await serialize_response(
            field=route.response_field,
            response_content=found,
            by_alias=route.response_model_by_alias,
            exclude_none=route.response_model_exclude_none,
            dump_json=True,
        )
        return Response(content=content, media_type="application/json", status_code=200)


def install_work_route(app: FastAPI) -> None:
    """Put :class:`WorkRoute` in front of every other route of ``app``."""
    fastapi_route = next(
        route
        for route in device_work.router.routes
        if isinstance(route, APIRoute) and route.endpoint is device_work.work
    )
    app.router.routes.insert(0, WorkRoute(fastapi_route))
