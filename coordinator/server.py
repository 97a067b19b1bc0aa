"""Run the coordinator under uvicorn (``fedge coordinator serve``).

HTTPS is the default: the server refuses to start without its certificate and key unless plain
HTTP was asked for explicitly (``--insecure-http`` / ``FEDGE_INSECURE_HTTP=true``), which is
only sound behind a proxy that terminates TLS. ``X-Forwarded-*`` headers are honoured only
from the addresses in ``forwarded_allow_ips`` (uvicorn's rule; loopback by default).

The listening socket is bound before the app starts, so port 0 works: once the server is
ready it prints its URL and, when asked, writes the bound port to a file atomically (tests and
the demo wait for that file). SIGTERM and SIGINT stop it gracefully: no new connections,
in-flight requests get ``graceful_timeout_s`` to finish, the app's lifespan shuts down, and
the process exits with status 0.

With ``workers`` above 1 (``--workers`` / ``FEDGE_WORKERS``, PostgreSQL only) this process
binds the socket and supervises that many worker processes serving on it
(:mod:`fedge.coordinator.workers`); the port file is written once every worker accepts
connections.

Logging (:mod:`fedge.coordinator.logs`): uvicorn's loggers and the coordinator's own, the
latter at ``log_level``, on one stderr handler, as text lines or JSON objects
(``log_format``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from sqlalchemy.engine import make_url

from fedge.coordinator.app import create_app
from fedge.coordinator.bootstrap import SetupError, schema_report
from fedge.coordinator.logs import console_line, log_config
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls_live import LiveTls
from fedge.shared.durable import write_bytes_atomic

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ServeError(SetupError):
    """The server cannot start; the message says why and what to do."""


def check_tls(settings: Settings) -> tuple[Path, Path] | None:
    """The (certificate, key) pair to serve with, or None for explicit plain HTTP.

    Raises :class:`ServeError` when TLS is required and the files are missing or unusable.
    """
    if settings.insecure_http:
        return None
    cert, key = settings.tls_cert, settings.tls_key
    assert cert is not None and key is not None  # filled in by Settings
    missing = [str(p) for p in (cert, key) if not p.is_file()]
    if missing:
        raise ServeError(
            f"no TLS certificate to serve HTTPS with (missing: {', '.join(missing)}). "
            "Run `fedge coordinator init --data-dir DIR` to create a private CA and server "
            "certificate, or set FEDGE_TLS_CERT and FEDGE_TLS_KEY. Plain HTTP is only for "
            "running behind a TLS-terminating proxy and must be asked for with --insecure-http "
            "(FEDGE_INSECURE_HTTP=true)."
        )
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ServeError(f"cannot load TLS certificate {cert} with key {key}: {exc}") from exc
    return cert, key


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (port 0: the kernel picks one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def format_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically: readers see no file or the whole number."""
    write_bytes_atomic(path, f"{port}\n".encode("ascii"))


class StartedServer(uvicorn.Server):
    """uvicorn's server with a hook that runs once it accepts connections, and a graceful
    stop that first answers the waiting device long-polls (204, "nothing new"): they would
    otherwise hold the stop for up to ``long_poll_max_s`` and then be cancelled, which logs
    a CancelledError traceback and answers 500.

    With ``live_tls``, its certificate check runs every ``tls_check_interval_s`` on the
    server's event loop (:mod:`fedge.coordinator.tls_live`)."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None],
        *,
        live_tls: LiveTls | None = None,
        tls_check_interval_s: float = 3600.0,
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._live_tls = live_tls
        self._tls_check_interval_s = tls_check_interval_s
        self._tls_watch: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            if self._live_tls is not None:
                self._tls_watch = asyncio.create_task(
                    self._live_tls.watch(self._tls_check_interval_s), name="tls-watch"
                )
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            with suppress(asyncio.CancelledError):
                await self._tls_watch
        runtime = getattr(getattr(self.config.app, "state", None), "runtime", None)
        notifier = getattr(runtime, "notifier", None)
        if notifier is not None:
            woken = notifier.drain()
            if woken:
                logging.getLogger(__name__).info(
                    "stopping: answered %d waiting long-poll(s)", woken
                )
        await super().shutdown(sockets=sockets)


@contextmanager
def _quiet_stop_signals() -> Iterator[None]:
    """After a graceful stop uvicorn re-raises the signal it caught to the previous handler.
    With the default handlers that would kill the process (SIGTERM -> status -15) or raise
    KeyboardInterrupt; these no-op handlers let ``serve`` return 0 instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _ignore(_sig: int, _frame: FrameType | None) -> None:
        return None

    previous = {sig: signal.signal(sig, _ignore) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _warn(message: str, fmt: str = "text") -> None:
    line = console_line(fmt, f"fedge coordinator serve: {message}", level="warning")
    print(line, file=sys.stderr, flush=True)


def _say(message: str, fmt: str) -> None:
    print(console_line(fmt, message), flush=True)


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse several worker processes where they are not supported (SQLite).

    SQLite takes one writer at a time for the whole file: more processes add no write
    throughput, only lock waits, and a database file is reachable from one host alone. One
    process per SQLite database is what is supported; several need PostgreSQL."""
    if workers < 1:
        raise ServeError(f"--workers must be at least 1 (got {workers})")
    if workers > 1 and make_url(settings.database_url).get_backend_name() == "sqlite":
        raise ServeError(
            f"--workers {workers} (FEDGE_WORKERS) needs PostgreSQL: on SQLite the coordinator "
            "runs as one process (SQLite has one writer at a time, so more processes only "
            "wait on its lock). Serve with --workers 1, or set FEDGE_DATABASE_URL to a "
            "PostgreSQL database (postgresql+psycopg://...); see docs/deploy.md, "
            '"Several processes".'
        )


def open_tls(live: LiveTls | None) -> None:
    """Renew the certificate when it is due and ours to renew, then load it (after
    :func:`uvicorn_config`, which sets up logging)."""
    if live is None:
        return
    try:
        live.open()
    except (ssl.SSLError, OSError, ValueError) as exc:
        paths = live.paths
        raise ServeError(
            f"cannot load TLS certificate {paths.server_cert} with key {paths.server_key}: {exc}"
        ) from exc


def uvicorn_config(
    app: Any,
    settings: Settings,
    tls: LiveTls | None,
    *,
    forwarded_allow_ips: str | None,
    graceful_timeout_s: int,
) -> uvicorn.Config:
    """The uvicorn configuration of one coordinator process (a worker, or the only one):
    with ``tls``, uvicorn serves HTTPS with its context (not one of its own making)."""

    def context(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        assert tls is not None
        return tls.context

    return uvicorn.Config(
        app,
        ssl_context_factory=context if tls is not None else None,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level, settings.log_format),
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_graceful_shutdown=graceful_timeout_s,
        server_header=False,
        # Every byte counts on a device's link: no Date header on every answer, and idle
        # connections kept long enough to outlive a round of local training.
        date_header=False,
        timeout_keep_alive=int(max(1, round(settings.keepalive_s))),
    )


def run_server(server: uvicorn.Server, sock: socket.socket) -> bool:
    """Serve on ``sock`` until SIGTERM/SIGINT (or ``should_exit``); True if it had started."""
    with _quiet_stop_signals(), asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(server.serve(sockets=[sock]))
    return server.started


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (it comes with the coordinator's dependencies:
    its TLS and socket handling take a fraction of the CPU of asyncio's), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a trimmed install
        return None
    return uvloop.new_event_loop


def serve(
    settings: Settings,
    *,
    workers: int | None = None,
    port_file: Path | None = None,
    forwarded_allow_ips: str | None = None,
    graceful_timeout_s: int = 10,
) -> int:
    """Serve the coordinator until SIGTERM/SIGINT; returns the process exit status.

    ``workers`` (default ``settings.workers``) above 1 runs that many worker processes on the
    one listening socket under a supervisor (:mod:`fedge.coordinator.workers`)."""
    fmt = settings.log_format
    count = settings.workers if workers is None else workers
    check_workers(settings, count)
    tls = check_tls(settings)
    scheme = "https" if tls else "http"
    if tls is None:
        _warn(
            "WARNING: serving plain HTTP because --insecure-http / FEDGE_INSECURE_HTTP is set. "
            "Do this only behind a proxy that terminates TLS: API keys and device traffic "
            "would otherwise cross the network unencrypted.",
            fmt,
        )
    try:
        status = schema_report(settings)
        if status.after != status.head:
            _warn(
                f"the database schema is at {status.after or 'nothing'}, expected "
                f"{status.head}; /readyz answers 503 until `fedge coordinator migrate` runs",
                fmt,
            )
    except SetupError as exc:
        _warn(f"{exc}; /readyz answers 503 until the database is reachable", fmt)

    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url = format_url(scheme, settings.host, port)
    wrote_port_file = False

    def announce() -> None:
        nonlocal wrote_port_file
        _say(f"fedge coordinator listening on {url}", fmt)
        if tls is not None:
            _say(f"TLS certificate {tls[0]}", fmt)
        if count > 1:
            _say(f"{count} worker processes", fmt)
        if port_file is not None:
            write_port_file(port_file, port)
            wrote_port_file = True

    try:
        if count == 1:
            live = LiveTls(*tls, group=settings.tls_group) if tls else None
            config = uvicorn_config(
                create_app(settings),
                settings,
                live,
                forwarded_allow_ips=forwarded_allow_ips,
                graceful_timeout_s=graceful_timeout_s,
            )
            open_tls(live)
            server = StartedServer(
                config,
                on_started=announce,
                live_tls=live,
                tls_check_interval_s=settings.tls_check_interval_s,
            )
            started = run_server(server, sock)
        else:
            from fedge.coordinator.workers import Supervisor

            supervisor = Supervisor(
                settings,
                sock,
                count,
                forwarded_allow_ips=forwarded_allow_ips,
                graceful_timeout_s=graceful_timeout_s,
            )
            started = supervisor.run(on_ready=announce)
    finally:
        sock.close()
        if port_file is not None and wrote_port_file:
            with suppress(FileNotFoundError):
                port_file.unlink()
    _say("fedge coordinator stopped", fmt)
    return 0 if started else 1
