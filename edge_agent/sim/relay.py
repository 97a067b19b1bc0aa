"""A TCP relay on loopback that counts the bytes crossing it in each direction.

Devices connect to the relay instead of the coordinator; every byte they send (``up``) and
receive (``down``) is counted as it crosses the socket: TLS handshakes and records, HTTP
headers, signed headers, polls and bodies alike. This is the figure a metered link bills,
and the same way the benchmarks count another system's traffic (a counting relay in front of
its server), so the two compare like for like.

    with CountingRelay("127.0.0.1", coordinator_port) as relay:
        url = f"https://localhost:{relay.port}"   # give this to the agents
        ...
        print(relay.counts())                     # Counts(up=..., down=..., connections=...)

The relay runs its own asyncio loop in a daemon thread; :meth:`CountingRelay.close` stops it
and closes every relayed connection.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

__all__ = ["CountingRelay", "Counts"]

_READ = 65536


@dataclass(frozen=True)
class Counts:
    """Cumulative bytes relayed: ``up`` client -> server, ``down`` server -> client."""

    up: int = 0
    down: int = 0
    connections: int = 0

    @property
    def total(self) -> int:
        return self.up + self.down

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.up - other.up, self.down - other.down, self.connections - other.connections
        )


class CountingRelay:
    """Relays ``127.0.0.1:<port>`` to ``target_host:target_port`` and counts both directions."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"):
        self.target = (target_host, int(target_port))
        self.listen_host = listen_host
        self.port = 0
        self._up = 0
        self._down = 0
        self._connections = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CountingRelay:
        self._thread = threading.Thread(target=self._run, name="counting-relay", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"the counting relay did not start: {self._error}")
        return self

    def close(self) -> None:
        loop, thread, stopped = self._loop, self._thread, self._stopped
        if loop is None or thread is None:
            return
        if stopped is not None:
            loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> CountingRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counts(self) -> Counts:
        with self._lock:
            return Counts(self._up, self._down, self._connections)

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        try:
            server = await asyncio.start_server(self._handle, self.listen_host, 0)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = int(server.sockets[0].getsockname()[1])
        self._stopped = asyncio.Event()
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.close()
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with self._lock:
            self._connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, server_w))
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w, up=True), self._pipe(server_r, client_w, up=False)
            )
        except asyncio.CancelledError:
            # close() cancels open connections; end quietly (asyncio's server callback logs a
            # cancelled handler as an unhandled exception)
            pass
        finally:
            self._writers.difference_update((client_w, server_w))
            client_w.close()
            server_w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        try:
            while data := await reader.read(_READ):
                with self._lock:
                    if up:
                        self._up += len(data)
                    else:
                        self._down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            try:
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
            except (OSError, RuntimeError):
                writer.close()
