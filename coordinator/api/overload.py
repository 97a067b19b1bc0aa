"""A cap on requests in flight, answered with 503 ``overloaded`` beyond it.

Blocking request work runs in a pool of ``worker_threads`` threads, and a request may hold
SQLite's write lock (or a pooled PostgreSQL connection) from one threaded step to the next.
If every thread were waiting for that lock while its holder waited for a thread, the server
would stall until database timeouts fired. A request uses at most one thread at a time, so
keeping the requests in flight (``max_connections``, long-polls included) below the number of
threads rules that out; ``Settings`` enforces the margin. Beyond the cap a request is refused
at once with ``Retry-After``, which agents honour.

Device routes (under ``device_prefix``) may fill only ``device_limit`` of the slots
(``max_connections`` minus ``reserved_connections``): the rest is kept for ``/healthz``,
``/readyz`` and the admin API, so that devices' long-polls cannot lock operators and probes
out. The total stays within ``max_connections``, so the margin above still holds. How many of
the device slots one device may take is :class:`fedge.coordinator.auth.DeviceSlots`' business.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedge.coordinator.paths import DEVICE_PREFIX

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY = json.dumps(
    {"error": "overloaded", "detail": "the coordinator is at its request limit; retry shortly"}
).encode()


class OverloadMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        device_limit: int | None = None,
        device_prefix: str = DEVICE_PREFIX + "/",
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.device_limit = max_in_flight if device_limit is None else device_limit
        self.device_prefix = device_prefix
        self.in_flight = 0
        self.device_in_flight = 0  # part of in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        device = str(scope.get("path", "")).startswith(self.device_prefix)
        if self.in_flight >= self.max_in_flight or (
            device and self.device_in_flight >= self.device_limit
        ):
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_BODY)).encode()),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _BODY})
            return
        # One event loop: no lock needed.
        self.in_flight += 1
        self.device_in_flight += device
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.device_in_flight -= device
