"""An unexpected error is answered 500 ``internal_error`` and the kept-alive connection stays
open for the client's next request: a real coordinator over HTTPS on loopback, with one route
added that fails the way a bug would."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from fedge.coordinator.app import create_app
from fedge.coordinator.errors import INTERNAL_DETAIL
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.support.servers import serve_in_thread


class Bug(RuntimeError):
    """What a handler raises when it has a bug."""


def app_with_bugs(settings: Settings) -> FastAPI:
    app = create_app(settings)

    @app.get("/test/bug")
    def bug() -> dict[str, str]:
        raise Bug("a handler's bug")

    @app.get("/test/bug-mid-answer")
    def bug_mid_answer() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"partial": '
            raise Bug("a bug after the answer started")

        return StreamingResponse(chunks(), media_type="application/json")

    return app


@pytest.fixture
def served(tmp_path: Path, tls_paths: TlsPaths, db_url: str) -> Iterator[httpx.Client]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        scheduler_enabled=False,
    )
    with (
        serve_in_thread(
            app_with_bugs(settings), certfile=settings.tls_cert, keyfile=settings.tls_key
        ) as url,
        httpx.Client(
            base_url=url, verify=ssl.create_default_context(cafile=tls_paths.ca_cert), timeout=30
        ) as client,
    ):
        yield client


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_unexpected_error_is_a_500_and_the_connection_stays_open(
    served: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fedge.coordinator")
    first = served.get("/healthz")
    assert first.status_code == 200
    failed = served.get("/test/bug")
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal_error", "detail": INTERNAL_DETAIL}
    assert "a handler's bug" not in failed.text  # the traceback goes to the log only
    after = served.get("/healthz")
    assert after.status_code == 200
    # one connection (and one TLS handshake) served all three
    stream = first.extensions["network_stream"]
    assert failed.extensions["network_stream"] is stream
    assert after.extensions["network_stream"] is stream
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and isinstance(logged[0].exc_info[1], Bug)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_error_after_the_answer_started_breaks_that_answer_only(
    served: httpx.Client,
) -> None:
    """A half-sent answer cannot become a 500: the connection is closed, so the client sees
    an incomplete answer (never a complete one), and its next request gets a new
    connection."""
    first = served.get("/healthz")
    with pytest.raises(httpx.RemoteProtocolError):
        served.get("/test/bug-mid-answer")
    after = served.get("/healthz")
    assert after.status_code == 200
    assert after.extensions["network_stream"] is not first.extensions["network_stream"]
