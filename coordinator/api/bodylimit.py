"""A request body limit enforced before any handler reads the body.

FastAPI reads and parses a JSON body before a route's dependencies run, so neither
authentication nor a handler could stop an oversized body from being read into memory. This
ASGI middleware refuses, with 413 ``payload_too_large``, a body whose ``Content-Length``
exceeds the route's limit, and stops a streamed (chunked) body as soon as it does:

- the two binary routes get the configured limits (``PUT /api/v1/tasks/{id}/model``:
  ``max_model_bytes``; ``POST /api/v1/device/assignments/{id}/update``: ``max_upload_bytes``);
- every other route (JSON bodies) gets :data:`MAX_JSON_BODY`.

Routes still check their exact limit while reading (:func:`fedge.coordinator.auth.read_body`).

A client that closes its connection before its body is in makes the reader raise Starlette's
``ClientDisconnect``. Nobody is left to answer, so that is not an application error: the
middleware logs it as one INFO line (method, path, bytes received) and ends the request,
instead of letting the error handler render a 500 for nobody and uvicorn log the exception a
second time, each with a traceback. Nothing was changed by the request: device requests are
verified, and handlers act, only once the whole body is in.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from fedge.coordinator.paths import API_PREFIX, DEVICE_PREFIX
from fedge.coordinator.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

#: Largest body of a JSON route (task definitions, metrics, enrollment, ...).
MAX_JSON_BODY = 1 << 20


def binary_routes(settings: Settings) -> list[tuple[str, re.Pattern[str], int]]:
    return [
        (
            "PUT",
            re.compile(rf"^{re.escape(API_PREFIX)}/tasks/[^/]+/model$"),
            settings.max_model_bytes,
        ),
        (
            "POST",
            re.compile(rf"^{re.escape(DEVICE_PREFIX)}/assignments/[^/]+/update$"),
            settings.max_upload_bytes,
        ),
    ]


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.routes = binary_routes(settings)

    def limit_for(self, method: str, path: str) -> int:
        for route_method, pattern, limit in self.routes:
            if method == route_method and pattern.match(path):
                return limit
        return MAX_JSON_BODY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit)
            return

        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _refuse(send, limit)
                    # The application sees a client that went away and stops reading.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent; drop the application's answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ClientDisconnect:
            if refused:
                return  # the client has its 413
            log.info(
                "client disconnected mid-request: %s %s, %d of %s body bytes received",
                scope["method"],
                scope["path"],
                received,
                "?" if declared is None else declared,
            )
        except Exception:
            if not refused:
                raise
            # Reading a refused body ends in an error in the application; the client already
            # has its 413.


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": "payload_too_large", "detail": f"body exceeds the limit of {limit} bytes"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
