"""Run a real coordinator as a child process on loopback (for the demo and tests).

The agent package never imports the coordinator: this module runs ``fedge coordinator init``
and ``fedge coordinator serve`` as subprocesses (``python -m fedge.shared.cli coordinator ...``)
with a data directory of their own (SQLite, blob store, private CA), reads the bootstrap admin key
from ``init``'s output and the bound port from ``serve --port-file``, and waits until
``/healthz`` answers over HTTPS with the pinned CA.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess  # nosec B404  # fixed argument lists, never a shell
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.transport import verify_setting

_KEY_LINE = re.compile(r"^\s{2,}(\S{16,})\s*$")


class CoordinatorStartError(RuntimeError):
    """The coordinator process did not come up; the message includes its output."""


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedge.shared.cli", "coordinator", *args]


def _child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without FEDGE_* settings (the child is self-contained)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    env.update(overrides)
    return env


def parse_admin_key(output: str) -> str:
    """The bootstrap admin key printed by ``fedge coordinator init`` (an indented line after
    the line announcing the key)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "API key" in line:
            for candidate in lines[i + 1 :]:
                if not candidate.strip():
                    continue
                match = _KEY_LINE.match(candidate)
                if match:
                    return match.group(1)
                break
    raise CoordinatorStartError(f"no admin key in the output of init:\n{output}")


@dataclass
class LocalCoordinator:
    """A running coordinator child process."""

    data_dir: Path
    url: str
    ca_file: str
    admin_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    def running(self) -> bool:
        return self.process.poll() is None

    def admin(self, **kwargs: Any) -> AdminClient:
        """An admin API client for this coordinator (its URL, admin key and CA);
        ``kwargs`` go to :class:`~fedge.edge_agent.admin_client.AdminClient`."""
        return AdminClient(self.url, self.admin_key, ca_file=self.ca_file, **kwargs)

    def stop(self, *, timeout: float = 20.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(self.process.returncode)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> LocalCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_coordinator(
    data_dir: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 60.0,
) -> LocalCoordinator:
    """Initialize ``data_dir`` and serve it on a free loopback port over HTTPS."""
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    child_env = _child_env(env or {})
    init = subprocess.run(  # noqa: S603  # nosec B603  # our interpreter, fixed arguments
        _command("init", "--data-dir", str(root), "--host", "127.0.0.1"),
        capture_output=True,
        env=child_env,
        timeout=startup_timeout,
        check=False,
    )
    output = init.stdout.decode(errors="replace")
    if init.returncode != 0:
        raise CoordinatorStartError(
            f"`fedge coordinator init` failed ({init.returncode}):\n"
            f"{output}{init.stderr.decode(errors='replace')}"
        )
    admin_key = parse_admin_key(output)
    ca_file = str(root / "tls" / "ca.crt")
    port_file = root / "port"
    with contextlib.suppress(FileNotFoundError):
        port_file.unlink()
    log_path = root / "coordinator.log"
    log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    process = subprocess.Popen(  # noqa: S603  # nosec B603  # our interpreter, fixed arguments
        _command(
            "serve",
            "--data-dir",
            str(root),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env,
    )
    coordinator = LocalCoordinator(root, "", ca_file, admin_key, process, log_path, log)
    try:
        coordinator.url = _wait_until_healthy(coordinator, port_file, startup_timeout)
    except BaseException:
        coordinator.stop(timeout=5)
        raise
    return coordinator


def _wait_until_healthy(coordinator: LocalCoordinator, port_file: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    url = ""
    last_error = "no port yet"
    with httpx.Client(verify=verify_setting(coordinator.ca_file), timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not coordinator.running():
                raise CoordinatorStartError(
                    f"the coordinator exited ({coordinator.process.returncode}):\n"
                    f"{coordinator.log_text()}"
                )
            if not url:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    url = f"https://127.0.0.1:{int(port_file.read_text().strip())}"
            if url:
                try:
                    if client.get(f"{url}/healthz").status_code == 200:
                        return url
                except httpx.HTTPError as exc:
                    last_error = str(exc)
            time.sleep(0.1)
    raise CoordinatorStartError(
        f"the coordinator did not answer within {timeout:.0f} s ({last_error}):\n"
        f"{coordinator.log_text()}"
    )
