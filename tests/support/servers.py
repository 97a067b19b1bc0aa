"""A real uvicorn server on a loopback port in a background thread, with HTTPS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    def install_signal_handlers(self) -> None:  # the main thread keeps its handlers
        pass


def free_port() -> int:
    """A loopback port free at the moment (for a server that is stopped and served again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(
    app: FastAPI,
    *,
    certfile: Path | None,
    keyfile: Path | None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30,
    port: int = 0,
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port, or ``port``: a coordinator restarted where its
    devices know it); yield its base URL. With ``ssl_context``
    (the coordinator's, or one made to fail a test) uvicorn serves HTTPS with that context
    instead of making one from ``certfile`` and ``keyfile``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        ssl_context_factory=(lambda _config, _default: ssl_context) if ssl_context else None,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            server.ready.set()

    thread = threading.Thread(target=run, name="uvicorn-test", daemon=True)
    thread.start()
    if not server.ready.wait(timeout) or errors or not server.started:
        server.should_exit = True
        raise RuntimeError(f"test server did not start: {errors}")
    scheme = "https" if certfile or ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
