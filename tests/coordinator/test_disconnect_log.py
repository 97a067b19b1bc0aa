"""A client that closes its connection in the middle of an upload costs one log line.

It used to cost two full tracebacks: reading the body raised Starlette's ``ClientDisconnect``,
which the catch-all error handler logged as an unhandled error (answering 500 to nobody) and
uvicorn then logged again as an exception in the ASGI application.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from fedge.coordinator.app import create_app
from fedge.coordinator.auth import get_device_slots
from fedge.coordinator.models import UsedNonce
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.coordinator import test_tls_serve
from tests.coordinator.conftest import Coordinator, make_key
from tests.coordinator.test_overload import RawRequest
from tests.coordinator.test_tls_serve import serving, stop
from tests.support.device import API, SignedDevice
from tests.support.rounds import Db, wait_until
from tests.support.servers import serve_in_thread

DECLARED = 100_000
UPLOAD = f"{API}/device/assignments/1/update"
initialized = test_tls_serve.initialized  # the fixture: a data directory from fedge init


def half_upload(url: str, ca_file: Path, device: SignedDevice) -> None:
    """Send an upload's head and half its body, then close the connection."""
    body = bytes(DECLARED)
    request = device.build("POST", UPLOAD, content=body, headers={"Idempotency-Key": "k1"})
    with RawRequest(url, ca_file, request) as raw:
        raw.send_head()
        raw.send(body[: DECLARED // 2])


class Recorder(logging.Handler):
    """Every record the coordinator (INFO and up) and uvicorn log while attached; ``first``
    is set by the first one. uvicorn's loggers do not propagate to the root logger, so the
    recorder hangs on both. Attach it once the server runs: uvicorn's logging configuration
    replaces the handlers of its loggers."""

    LOGGERS = ("", "uvicorn")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.first = threading.Event()
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.first.set()

    def lines(self) -> list[str]:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return [formatter.format(r) for r in self.records]

    def attach(self) -> None:
        ours = logging.getLogger("fedge.coordinator")
        self._level = ours.level
        ours.setLevel(logging.INFO)
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        logging.getLogger("fedge.coordinator").setLevel(self._level)


def test_a_client_gone_mid_upload_is_one_log_line(
    settings: Settings, coordinator: Coordinator
) -> None:
    db = Db(settings)
    recorder = Recorder()
    try:
        # A server of its own: stopping it waits for every request's task, so every line the
        # disconnect causes has been logged before the assertions.
        app = create_app(settings)
        make_key(settings, "admin")
        with serve_in_thread(app, certfile=settings.tls_cert, keyfile=settings.tls_key) as url:
            recorder.attach()
            with SignedDevice.enroll(coordinator) as device:
                nonces = _nonces(db)
                seen = db.device(device.device_id).last_seen_at
                half_upload(url, coordinator.ca_file, device)
                assert recorder.first.wait(10), "the disconnect was not logged"
        recorder.detach()
        lines = recorder.lines()
        assert len(lines) == 1, lines
        assert "Traceback" not in lines[0]
        assert all(r.exc_info is None and r.levelno < logging.ERROR for r in recorder.records)
        assert "disconnected" in lines[0] and "/update" in lines[0], lines
        assert get_device_slots(app.state.runtime).in_flight(device.device_id) == 0
        # Nothing changed: no nonce was spent and the device was not seen.
        assert _nonces(db) == nonces
        assert db.device(device.device_id).last_seen_at == seen
    finally:
        recorder.detach()
        db.close()


def _nonces(db: Db) -> int:
    return db.read(lambda s: int(s.scalar(select(func.count()).select_from(UsedNonce)) or 0))


@dataclass
class _Served:
    url: str
    ca_file: Path
    admin_key: str

    def admin(self) -> httpx.Client:
        verify = ssl.create_default_context(cafile=str(self.ca_file))
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=30)


@pytest.mark.slow
def test_fedge_coordinator_serve_logs_the_disconnect_as_one_line(
    initialized: tuple[Path, str], tmp_path: Path
) -> None:
    """The same through ``fedge coordinator serve`` and its logging configuration, where the
    line is printed at the default log level."""
    data_dir, admin_key = initialized
    ca = TlsPaths.in_dir(data_dir / "tls").ca_cert
    with serving(tmp_path, "--data-dir", str(data_dir)) as served:
        server = _Served(f"https://127.0.0.1:{served.port}", ca, admin_key)
        with SignedDevice.enroll(server) as device:
            half_upload(server.url, ca, device)
        wait_until(lambda: "disconnected" in served.output()[1])
        assert stop(served) == 0
        _, err = served.output()
    lines = [line for line in err.splitlines() if "disconnected" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("INFO:") and UPLOAD in lines[0], err
    assert "Traceback" not in err and "ERROR" not in err, err
