"""The counting relay counts every byte on the socket, both ways, TLS included."""

from __future__ import annotations

import socket
import ssl
import threading

import httpx
import pytest

from fedge.edge_agent.sim.relay import CountingRelay
from fedge.edge_agent.transport import Session
from tests.edge_agent.conftest import LiveCoordinator


@pytest.fixture
def echo_server():
    """A plain TCP server that answers each chunk with twice its bytes."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data * 2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


def test_counts_bytes_each_way(echo_server: int) -> None:
    with CountingRelay("127.0.0.1", echo_server) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            s.sendall(b"x" * 1000)
            got = b""
            while len(got) < 2000:
                got += s.recv(4096)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(10) == b""
        counts = relay.counts()
    assert got == b"x" * 2000
    assert (counts.up, counts.down, counts.connections) == (1000, 2000, 1)
    assert counts.total == 3000


def test_counts_tls_records_of_a_real_https_exchange(live: LiveCoordinator) -> None:
    """Through the relay an HTTPS request costs more than its body: handshake and records."""
    port = httpx.URL(live.url).port
    assert port is not None
    with CountingRelay("127.0.0.1", port) as relay:
        ctx = ssl.create_default_context(cafile=live.ca_file)
        with httpx.Client(base_url=f"https://localhost:{relay.port}", verify=ctx) as client:
            response = client.get("/healthz")
            assert response.status_code == 200
            first = relay.counts()
            client.get("/healthz")  # the same connection: no second handshake
            second = relay.counts()
    assert first.connections == second.connections == 1
    assert first.up > 200 and first.down > len(response.content) + 500  # handshake + headers
    assert 0 < (second - first).total < first.total


def test_the_agent_sends_no_default_headers_and_reuses_its_connection(
    live: LiveCoordinator,
) -> None:
    port = httpx.URL(live.url).port
    assert port is not None
    with CountingRelay("127.0.0.1", port) as relay:
        session = Session(f"https://localhost:{relay.port}", ca_file=live.ca_file)
        try:
            first = session.request("GET", "/healthz")
            second = session.request("GET", "/healthz")
        finally:
            session.close()
        counts = relay.counts()
    sent = {name.lower() for name in first.request.headers}
    assert not sent & {"user-agent", "accept", "accept-encoding", "connection"}
    assert second.status_code == 200 and counts.connections == 1


def test_close_with_open_connections_is_quiet(
    echo_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing the relay while a device still holds a kept-alive connection ends it without
    asyncio logging the cancelled handler as an unhandled exception; the counts stay."""
    relay = CountingRelay("127.0.0.1", echo_server).start()
    with socket.create_connection(("127.0.0.1", relay.port)) as s:
        s.sendall(b"y" * 10)
        got = b""
        while len(got) < 20:
            got += s.recv(4096)
        with caplog.at_level("ERROR"):
            relay.close()
        assert s.recv(10) == b""  # the relay closed its side
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert (relay.counts().up, relay.counts().down) == (10, 20)
