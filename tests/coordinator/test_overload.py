"""Many requests at once: the coordinator answers each of them, or refuses it cleanly.

With few worker threads and requests holding SQLite's write lock from one threaded step to
the next, an unbounded number of requests in flight used to stall the server until database
timeouts fired (every thread waiting for the lock, its holder waiting for a thread).

Device routes may fill only ``max_connections - reserved_connections`` of the requests in
flight: the rest is kept for ``/healthz``, ``/readyz`` and the admin API, which used to get
503 while devices' long-polls held every slot.

:class:`RawRequest` (also used by test_device_caps.py and test_disconnect_log.py) writes one
HTTP/1.1 request by hand on its own TLS connection, so a test decides when the body is sent,
whether it is sent at all, and when the connection closes.
"""

from __future__ import annotations

import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.device import API, SignedDevice
from tests.support.rounds import wait_until

THREADS = 24
IN_FLIGHT = THREADS - 16
RESERVED = 2


class RawRequest:
    """``request`` (an ``httpx.Request``, e.g. from ``SignedDevice.build``) on a connection
    of its own; :meth:`send_head` writes the request line and headers only."""

    def __init__(self, url: str, ca_file: Path, request: httpx.Request, *, timeout: float = 10):
        self.request = request
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 443
        context = ssl.create_default_context(cafile=str(ca_file))
        self.sock = context.wrap_socket(
            socket.create_connection((host, port), timeout=timeout), server_hostname=host
        )
        self._buffer = b""

    @classmethod
    def of(cls, coordinator: Coordinator, request: httpx.Request) -> RawRequest:
        return cls(coordinator.url, coordinator.ca_file, request)

    def send_head(self) -> RawRequest:
        target = self.request.url.raw_path.decode("ascii")
        lines = [f"{self.request.method} {target} HTTP/1.1".encode("ascii")]
        lines += [name + b": " + value for name, value in self.request.headers.raw]
        self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        return self

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_all(self) -> RawRequest:
        """Head and the whole body."""
        self.send_head()
        self.send(self.request.content)
        return self

    def response(self) -> httpx.Response:
        """The response (``Content-Length`` framed), waiting at most the socket timeout."""
        while b"\r\n\r\n" not in self._buffer:
            self._recv()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in header_lines)
        headers = httpx.Headers([(name, value.strip()) for name, _, value in fields])
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._recv()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection without an answer")
        self._buffer += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "worker_threads": THREADS,
            "max_connections": IN_FLIGHT,
            "reserved_connections": RESERVED,
        }
    )


def test_a_burst_of_requests_is_answered_or_refused_with_503(coordinator: Coordinator) -> None:
    # A client per thread and a fresh connection per request: what is tested is the server
    # under a burst, not one connection pool shared by many threads, nor the reuse of
    # keep-alive connections the server may close between two requests.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def get(_: int) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = coordinator.client(coordinator.admin_key, limits=no_reuse)
            with lock:
                clients.append(local.client)
        response: httpx.Response = local.client.get("/api/v1/tasks")
        return response

    try:
        with ThreadPoolExecutor(4 * THREADS) as pool:
            responses = list(pool.map(get, range(300)))
    finally:
        for client in clients:
            client.close()
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503}
    assert 200 in statuses
    for refused in (r for r in responses if r.status_code == 503):
        assert refused.json()["error"] == "overloaded"
        assert refused.headers["retry-after"] == "1"


def test_probes_and_administrators_are_served_while_devices_fill_their_share(
    coordinator: Coordinator,
) -> None:
    share = IN_FLIGHT - RESERVED
    notifier = coordinator.app.state.runtime.notifier
    per_device = coordinator.settings.device_max_long_polls - 1
    devices = [SignedDevice.enroll(coordinator) for _ in range(-(-share // per_device))]
    held: list[RawRequest] = []

    def poll(device: SignedDevice) -> RawRequest:
        request = device.build("GET", f"{API}/device/work", params={"wait": 30})
        raw = RawRequest.of(coordinator, request).send_all()
        held.append(raw)
        return raw

    def waiting() -> int:
        return sum(notifier.waiting(d.device_id) for d in devices)

    try:
        for i in range(share):
            poll(devices[i % len(devices)])
        wait_until(lambda: waiting() == share)
        # Device requests beyond the devices' share are refused at once, ...
        for device in devices:
            refused = poll(device).response()
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "overloaded"
            assert refused.headers["retry-after"] == "1"
        assert waiting() == share
        # ... while the reserve serves probes and administrators.
        with coordinator.client() as anonymous:
            assert anonymous.get("/healthz").status_code == 200
            assert anonymous.get("/readyz").status_code == 200
        with coordinator.viewer() as viewer:
            assert viewer.get(f"{API}/tasks").status_code == 200
    finally:
        for raw in held:
            raw.close()
        for device in devices:
            device.close()


def test_settings_keep_threads_above_requests_in_flight() -> None:
    with pytest.raises(ValueError, match="must exceed max_connections"):
        Settings(worker_threads=100, max_connections=90)


def test_settings_keep_slots_for_devices_and_for_the_reserve() -> None:
    assert Settings(worker_threads=1100).connection_reserve == 32
    assert Settings(worker_threads=24, max_connections=8).connection_reserve == 2
    assert Settings(worker_threads=24, max_connections=1).device_connections == 1
    with pytest.raises(ValueError, match="must be below max_connections"):
        Settings(worker_threads=24, max_connections=8, reserved_connections=8)
    with pytest.raises(ValueError, match="must be below device_max_in_flight"):
        Settings(device_max_in_flight=4, device_max_long_polls=4)
