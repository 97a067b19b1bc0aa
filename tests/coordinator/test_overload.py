"""Many requests at once: the coordinator answers each of them, or refuses it cleanly.

With few worker threads and requests holding SQLite's write lock from one threaded step to
the next, an unbounded number of requests in flight used to stall the server until database
timeouts fired (every thread waiting for the lock, its holder waiting for a thread)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator

THREADS = 24
IN_FLIGHT = THREADS - 16


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"worker_threads": THREADS, "max_connections": IN_FLIGHT})


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


def test_settings_keep_threads_above_requests_in_flight() -> None:
    with pytest.raises(ValueError, match="must exceed max_connections"):
        Settings(worker_threads=100, max_connections=90)
