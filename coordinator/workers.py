"""Several coordinator worker processes on one listening socket (``serve --workers N``).

The supervisor (the ``fedge coordinator serve`` process) binds the socket, then starts N
workers with ``python -m fedge.coordinator.workers``. Each worker inherits the socket, reads
its configuration as one JSON line on its standard input (the resolved settings, so every
worker sees exactly what the supervisor read from options, environment and
``coordinator.env``), builds its own app (database pool, scheduler, long-poll notifier,
caches, per-device limits) and serves with uvicorn; the kernel spreads connections over the
processes that accept on the socket. A worker tells the supervisor it accepts connections by
writing one byte to a pipe; the supervisor announces the URL (and writes ``--port-file``)
once every worker has.

The workers are as independent as coordinators on several hosts: they share only the
database (and the blob store), and each is named ``<instance_id>-<n>`` in the task leases.

- **A worker that dies** (crash, SIGKILL, out of memory) is started again under the same
  name, after a pause that doubles after each worker that exits before it is ready (0.5 s up
  to 10 s); after ``MAX_FAILED_STARTS`` such exits in a row the supervisor gives up, stops
  the others and exits with status 1 (a worker that cannot start will not start by retrying).
  Connections wait in the socket's backlog meanwhile, and the other workers go on serving.
- **SIGTERM or SIGINT** to the supervisor: every worker gets SIGTERM and stops gracefully
  (in-flight requests get ``graceful_timeout_s``); a worker still running
  ``graceful_timeout_s + KILL_MARGIN_S`` later is killed. Exit status 0.
- **The supervisor dies** (SIGKILL): each worker sees its standard input close and stops
  gracefully, so no worker outlives it serving on an orphaned socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess  # nosec B404  # fixed argument lists, never a shell
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from fedge.coordinator import metrics
from fedge.coordinator.settings import Settings

#: Workers that exit before they are ready, in a row, before the supervisor gives up.
MAX_FAILED_STARTS = 5
#: Seconds a worker may take to start (import, connect, start its engine).
START_TIMEOUT_S = 120.0
#: Seconds beyond the graceful timeout before a stopping worker is killed.
KILL_MARGIN_S = 5.0
_FIRST_PAUSE_S = 0.5
_MAX_PAUSE_S = 10.0
_TICK_S = 0.2


def worker_name(instance_id: str, index: int) -> str:
    """The lease holder name of worker ``index`` (stable across its restarts)."""
    return f"{instance_id}-{index}"


def _log(message: str) -> None:
    print(f"fedge coordinator serve: {message}", file=sys.stderr, flush=True)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_fd: int | None  # read end of its readiness pipe, until it reported or exited
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)

    def close_pipe(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one ``serve``."""

    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        count: int,
        *,
        forwarded_allow_ips: str | None,
        graceful_timeout_s: int,
        command: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.sock = sock
        self.count = count
        self.forwarded_allow_ips = forwarded_allow_ips
        self.graceful_timeout_s = graceful_timeout_s
        self.command = command or [sys.executable, "-m", "fedge.coordinator.workers"]
        self.workers: dict[int, _Worker] = {}
        self._stop = threading.Event()
        self._failed_starts = 0
        self._next_start: dict[int, float] = {}

    # -- one worker ------------------------------------------------------------------------

    def _spec(self, index: int, ready_w: int) -> bytes:
        settings = self.settings.model_dump(mode="json")
        settings["instance_id"] = worker_name(self.settings.instance_id, index)
        # database_url is already read from the *_FILE secrets: the worker must not read them
        # again (with the URL given as well, Settings refuses FEDGE_DATABASE_URL_FILE, which
        # the worker inherits in its environment).
        settings["database_url_file"] = settings["database_password_file"] = None
        spec = {
            "settings": settings,
            "socket_fd": self.sock.fileno(),
            "ready_fd": ready_w,
            "index": index,
            "forwarded_allow_ips": self.forwarded_allow_ips,
            "graceful_timeout_s": self.graceful_timeout_s,
        }
        return json.dumps(spec).encode() + b"\n"

    def _start(self, index: int) -> None:
        ready_r, ready_w = os.pipe()
        try:
            process = subprocess.Popen(  # noqa: S603  # nosec B603  # our interpreter and module
                self.command,
                stdin=subprocess.PIPE,
                pass_fds=(self.sock.fileno(), ready_w),
            )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        assert process.stdin is not None
        # The pipe stays open: its end tells the worker that the supervisor is gone.
        process.stdin.write(self._spec(index, ready_w))
        process.stdin.flush()
        self.workers[index] = _Worker(index, process, ready_r)

    def _reap(self, worker: _Worker) -> None:
        worker.close_pipe()
        if worker.process.returncode is not None:
            metrics.worker_exited(worker.process.pid)
        if worker.process.stdin is not None:
            with contextlib.suppress(OSError):
                worker.process.stdin.close()

    # -- the loop --------------------------------------------------------------------------

    def _on_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self._stop.set()

    def _poll_ready(self, timeout: float) -> None:
        """Mark workers that reported readiness (waits up to ``timeout`` for one)."""
        pending = {w.ready_fd: w for w in self.workers.values() if w.ready_fd is not None}
        if not pending:
            self._stop.wait(timeout)
            return
        readable, _, _ = select.select(list(pending), [], [], timeout)
        for fd in readable:
            worker = pending[fd]
            if os.read(fd, 1):
                worker.ready = True
                self._failed_starts = 0
            worker.close_pipe()  # reported, or exited before it could (end of file)

    def _check_exits(self, now: float) -> bool:
        """Restart workers that exited; False when the supervisor must give up."""
        for index, worker in list(self.workers.items()):
            status = worker.process.poll()
            if status is None:
                continue
            ready = worker.ready
            self._reap(worker)
            del self.workers[index]
            if not ready:
                self._failed_starts += 1
                if self._failed_starts >= MAX_FAILED_STARTS:
                    _log(
                        f"worker {index} exited with status {status} before it was ready; "
                        f"{self._failed_starts} failed starts in a row, giving up"
                    )
                    return False
            pause = min(_MAX_PAUSE_S, _FIRST_PAUSE_S * 2 ** max(0, self._failed_starts - 1))
            _log(
                f"worker {index} (pid {worker.process.pid}) exited with status {status}; "
                f"starting it again in {pause:.1f} s"
            )
            self._next_start[index] = now + pause
        for index, when in list(self._next_start.items()):
            if now >= when:
                del self._next_start[index]
                self._start(index)
        for worker in self.workers.values():
            if not worker.ready and now - worker.started_at > START_TIMEOUT_S:
                _log(f"worker {worker.index} did not start within {START_TIMEOUT_S:.0f} s")
                return False
        return True

    def _stop_all(self) -> None:
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_timeout_s + KILL_MARGIN_S
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log(f"worker {worker.index} did not stop in time; killing it")
                worker.process.kill()
                worker.process.wait()
            self._reap(worker)
        self.workers.clear()

    def run(self, *, on_ready: Callable[[], None]) -> bool:
        """Run until SIGTERM/SIGINT. True when every worker started and the supervisor
        stopped on a signal; False when workers could not be (kept) running."""
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {
                sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
            }
        ok = False
        self.sock.listen(2048)  # connections queue while a worker (re)starts
        # Workers inherit the environment: they count into one directory that every worker
        # reads when it answers a scrape (fedge.coordinator.metrics).
        metrics_dir = metrics.prepare_multiprocess_dir() if self.settings.metrics_enabled else None
        try:
            for index in range(self.count):
                self._start(index)
            announced = False
            while not self._stop.is_set():
                self._poll_ready(_TICK_S)
                if not self._check_exits(time.monotonic()):
                    break
                everyone = len(self.workers) == self.count
                if not announced and everyone and all(w.ready for w in self.workers.values()):
                    announced = True
                    on_ready()
            ok = announced and self._stop.is_set()
        finally:
            self._stop_all()
            metrics.remove_multiprocess_dir(metrics_dir)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return ok


# -- the worker process ------------------------------------------------------------------------


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read unbuffered (nothing after it is consumed)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _watch_supervisor(stop: Callable[[], None]) -> None:
    """Block until the supervisor's end of standard input closes, then stop the worker.
    (Raw reads of the descriptor: a daemon thread blocked in a buffered read would abort the
    interpreter's shutdown.)"""
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    stop()


def worker_main() -> int:
    """Entry of ``python -m fedge.coordinator.workers`` (started by :class:`Supervisor`)."""
    # Imported here: the supervisor itself never builds an app.
    from fedge.coordinator.app import create_app
    from fedge.coordinator.server import (
        StartedServer,
        check_tls,
        open_tls,
        run_server,
        uvicorn_config,
    )
    from fedge.coordinator.tls_live import LiveTls

    line = _read_line(0)
    if not line:
        _log("worker started without a configuration on standard input")
        return 2
    spec = json.loads(line)
    settings = Settings(**spec["settings"])
    sock = socket.socket(fileno=int(spec["socket_fd"]))
    ready_fd = int(spec["ready_fd"])
    cert_key = check_tls(settings)
    tls = LiveTls(*cert_key, group=settings.tls_group) if cert_key else None
    config = uvicorn_config(
        create_app(settings),
        settings,
        tls,
        forwarded_allow_ips=spec["forwarded_allow_ips"],
        graceful_timeout_s=int(spec["graceful_timeout_s"]),
    )
    open_tls(tls)

    def ready() -> None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    server = StartedServer(
        config,
        on_started=ready,
        live_tls=tls,
        tls_check_interval_s=settings.tls_check_interval_s,
    )

    def stop() -> None:
        server.should_exit = True

    threading.Thread(target=_watch_supervisor, args=(stop,), daemon=True).start()
    return 0 if run_server(server, sock) else 1


if __name__ == "__main__":
    raise SystemExit(worker_main())
