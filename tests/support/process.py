"""A coordinator in a child process (``fedge coordinator serve``), for crash and multi-process
tests: it can be killed with SIGKILL, and several can share one database and blob store.

Usage::

    with coordinator_process(settings, tmp_path / "a", env={"FEDGE_LEASE_TTL_S": "1"}) as proc:
        with proc.admin() as admin: ...
        proc.kill()                       # SIGKILL, no cleanup of any kind
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import make_key

START_TIMEOUT_S = 60.0


@dataclass
class CoordinatorProcess:
    """A running child coordinator; quacks like the ``coordinator`` fixture for the helpers
    in tests/support (``url``, ``ca_file``, ``settings``, ``admin()``)."""

    url: str
    ca_file: Path
    settings: Settings
    admin_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            headers=headers,
            timeout=30,
        )

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean anything up."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _child_env(settings: Settings, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    env.update(
        {
            "FEDGE_TLS_CERT": str(settings.tls_cert),
            "FEDGE_TLS_KEY": str(settings.tls_key),
            "FEDGE_BLOB_DIR": str(settings.blobs),
            "FEDGE_SCHEDULER_INTERVAL_S": "0.05",
            "FEDGE_LONG_POLL_RECHECK_S": "0.2",
            "FEDGE_LOG_LEVEL": "warning",
        }
    )
    env.update(extra)
    return env


@contextmanager
def coordinator_process(
    settings: Settings,
    workdir: Path,
    *,
    ca_file: Path,
    env: Mapping[str, str] | None = None,
    port: int = 0,
    args: Sequence[str] = (),
) -> Iterator[CoordinatorProcess]:
    """Start ``fedge coordinator serve`` on ``settings``' database, blob store and TLS files
    (on ``port``, 0 for any free one; ``args``: more options); stop it (SIGTERM) on exit
    unless the test killed it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "coordinator.log"
    command = [
        sys.executable,
        "-m",
        "fedge.shared.cli",
        "coordinator",
        "serve",
        "--data-dir",
        str(settings.data_dir),
        "--database-url",
        settings.database_url,
        "--port",
        str(port),
        "--port-file",
        str(port_file),
        *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=_child_env(settings, env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    proc = CoordinatorProcess(
        url="",
        ca_file=ca_file,
        settings=settings,
        admin_key=make_key(settings, "admin"),
        process=process,
        log_path=log_path,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coordinator did not start:\n{proc.log()}")
            time.sleep(0.05)
        proc.url = f"https://127.0.0.1:{int(port_file.read_text())}"
        yield proc
    finally:
        proc.stop()
