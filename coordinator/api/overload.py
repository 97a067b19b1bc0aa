"""A cap on requests in flight, answered with 503 ``overloaded`` beyond it.

Blocking request work runs in a pool of ``worker_threads`` threads, and a request may hold
SQLite's write lock (or a pooled PostgreSQL connection) from one threaded step to the next.
If every thread were waiting for that lock while its holder waited for a thread, the server
would stall until database timeouts fired. A request uses at most one thread at a time, so
keeping the requests in flight (``max_connections``, long-polls included) below the number of
threads rules that out; ``Settings`` enforces the margin. Beyond the cap a request is refused
at once with ``Retry-After``, which agents honour.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY = json.dumps(
    {"error": "overloaded", "detail": "the coordinator is at its request limit; retry shortly"}
).encode()


class OverloadMiddleware:
    def __init__(self, app: ASGIApp, *, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
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
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
