"""The installed ``fedge`` command end to end: ``coordinator init`` then ``coordinator serve`` as
real processes, over real TLS on loopback, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedge.coordinator import migrate
from fedge.coordinator.tls import TlsPaths

pytestmark = pytest.mark.slow  # real processes: a few seconds each

START_TIMEOUT_S = 60
KEY_LINE = re.compile(r"^\s+(fk_[A-Za-z0-9_-]{43})$", re.MULTILINE)


def fedge_command() -> list[str]:
    """The installed console script when there is one, else the same entry point by module."""
    script = Path(sys.executable).with_name("fedge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fedge.shared.cli"]


def fedge(*argv: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*fedge_command(), *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    port_file: Path
    stdout: Path
    stderr: Path

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()


@contextmanager
def serving(tmp_path: Path, *argv: str) -> Iterator[Served]:
    """Start ``fedge coordinator serve --port 0 --port-file ...`` and wait (with a deadline)
    until it has written its port file. Kills the process if the test leaves it running."""
    port_file = tmp_path / "serve.port"
    stdout, stderr = tmp_path / "serve.out", tmp_path / "serve.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [
                *fedge_command(),
                "coordinator",
                "serve",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                *argv,
            ],
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}: {stderr.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not start within {START_TIMEOUT_S}s: {stderr.read_text()}")
            time.sleep(0.05)
        yield Served(process, int(port_file.read_text()), port_file, stdout, stderr)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def stop(served: Served) -> int:
    served.process.send_signal(signal.SIGTERM)
    return served.process.wait(timeout=30)


def handshake(port: int, *, cafile: Path, server_hostname: str) -> None:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname),
    ):
        pass


@pytest.fixture
def initialized(tmp_path: Path) -> tuple[Path, str]:
    data_dir = tmp_path / "coord"
    result = fedge("coordinator", "init", "--data-dir", str(data_dir), "--host", "fedge.test")
    assert result.returncode == 0, result.stderr
    keys = KEY_LINE.findall(result.stdout)
    assert len(keys) == 1, result.stdout
    return data_dir, keys[0]


def test_init_then_serve_over_verified_tls(
    initialized: tuple[Path, str], tmp_path: Path, tls_paths: TlsPaths
) -> None:
    data_dir, admin_key = initialized
    ca = TlsPaths.in_dir(data_dir / "tls").ca_cert
    with serving(tmp_path, "--data-dir", str(data_dir)) as served:
        base = f"https://127.0.0.1:{served.port}"
        verify = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=base, verify=verify, timeout=30) as client:
            health = client.get("/healthz")
            ready = client.get("/readyz")
            tasks = client.get("/api/v1/tasks", headers={"Authorization": f"Bearer {admin_key}"})
            anonymous = client.get("/api/v1/tasks")
            created = client.post(
                "/api/v1/api-keys",
                json={"name": "dashboard", "role": "viewer"},
                headers={"Authorization": f"Bearer {admin_key}"},
            )
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert tasks.status_code == 200, tasks.text
        assert tasks.json()["total"] == 0
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "unauthorized"
        assert created.status_code == 201, created.text  # an admin-only route

        # Without the generated CA the chain does not verify: the system trust store ...
        with (
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
            httpx.Client(base_url=base, timeout=30) as untrusting,
        ):
            untrusting.get("/healthz")
        # ... nor another fedge CA.
        other_ca = ssl.create_default_context(cafile=str(tls_paths.ca_cert))
        with (
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
            httpx.Client(base_url=base, verify=other_ca, timeout=30) as wrong_ca,
        ):
            wrong_ca.get("/healthz")

        # The certificate names what init was told (--host) and loopback, nothing else.
        handshake(served.port, cafile=ca, server_hostname="fedge.test")
        handshake(served.port, cafile=ca, server_hostname="localhost")
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            handshake(served.port, cafile=ca, server_hostname="elsewhere.test")

        assert stop(served) == 0
        out, err = served.output()
    assert f"listening on https://127.0.0.1:{served.port}" in out
    assert "stopped" in out
    assert "Traceback" not in err
    assert not served.port_file.exists()


def test_plain_http_needs_the_explicit_flag(tmp_path: Path) -> None:
    data_dir = tmp_path / "no-certs"
    refused = fedge("coordinator", "serve", "--data-dir", str(data_dir), "--port", "0")
    assert refused.returncode != 0
    assert "no TLS certificate" in refused.stderr
    assert "--insecure-http" in refused.stderr
    assert "Traceback" not in refused.stderr

    data_dir.mkdir()
    migrate.upgrade(f"sqlite:///{data_dir.resolve() / 'fedge.db'}")
    with serving(tmp_path, "--data-dir", str(data_dir), "--insecure-http") as served:
        with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=30) as client:
            ready = client.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        assert stop(served) == 0
        out, err = served.output()
    assert f"listening on http://127.0.0.1:{served.port}" in out
    assert "WARNING: serving plain HTTP" in err
    assert "Traceback" not in err
