"""``fedge coordinator serve --workers N``: N worker processes on one port under a supervisor.

On PostgreSQL the supervisor is a real child process here; the tests watch its workers through
``/proc`` (which processes are its children) and its answers over HTTPS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedge.coordinator.cli import main
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.coordinator.workers import Supervisor
from tests.support.process import CoordinatorProcess, coordinator_process
from tests.support.rounds import wait_until


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def ready(proc: CoordinatorProcess) -> bool:
    with proc.client() as client:
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


# -- SQLite: one process ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "environment"])
def test_several_workers_are_refused_on_sqlite_with_a_clear_message(
    tmp_path, tls_paths: TlsPaths, monkeypatch, capsys, how
):
    monkeypatch.setenv("FEDGE_TLS_CERT", str(tls_paths.server_cert))
    monkeypatch.setenv("FEDGE_TLS_KEY", str(tls_paths.server_key))
    argv = ["serve", "--data-dir", str(tmp_path), "--port", "0"]
    if how == "option":
        argv += ["--workers", "2"]
    else:
        monkeypatch.setenv("FEDGE_WORKERS", "2")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--workers 2 (FEDGE_WORKERS) needs PostgreSQL" in err
    assert "one process" in err


def test_a_worker_count_below_one_is_an_invalid_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDGE_WORKERS", "0")
    assert main(["serve", "--data-dir", str(tmp_path)]) == 2
    assert "FEDGE_WORKERS" in capsys.readouterr().err


# -- PostgreSQL: a supervisor and its workers -------------------------------------------------

pg_only = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@pytest.mark.postgres
@pytest.mark.slow
@pg_only
def test_workers_serve_one_port_a_killed_worker_is_replaced_and_sigterm_stops_all(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    with coordinator_process(
        settings, tmp_path / "sup", ca_file=tls_paths.ca_cert, args=["--workers", "2"]
    ) as proc:
        supervisor = proc.process.pid
        workers = wait_until(lambda: (c := children(supervisor)) and len(c) == 2 and c)
        assert "2 worker processes" in proc.log()
        assert ready(proc)

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # A new worker takes its place; the other one is untouched.
        replaced = wait_until(
            lambda: (c := children(supervisor)) and len(c) == 2 and victim not in c and c,
            timeout=60,
        )
        assert max(workers) in replaced
        assert "exited with status -9; starting it again" in proc.log()
        assert ready(proc)

        port_file = tmp_path / "sup" / "port"
        assert port_file.exists()
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(timeout=60) == 0
        assert not any(alive(pid) for pid in replaced)
        assert not port_file.exists()
        assert "fedge coordinator stopped" in proc.log()


@pytest.mark.postgres
@pytest.mark.slow
@pg_only
def test_workers_stop_when_their_supervisor_is_killed(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    with coordinator_process(
        settings, tmp_path / "sup", ca_file=tls_paths.ca_cert, args=["--workers", "2"]
    ) as proc:
        workers = wait_until(lambda: (c := children(proc.process.pid)) and len(c) == 2 and c)
        proc.kill()  # SIGKILL: the supervisor cannot stop them
        wait_until(lambda: not any(alive(pid) for pid in workers), timeout=60)


@pytest.mark.postgres
@pytest.mark.slow
@pg_only
def test_workers_that_cannot_start_make_serve_exit_with_status_1(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    """A bad eval hook fails every worker's start: the supervisor gives up instead of
    restarting them forever."""
    env = os.environ | {
        "FEDGE_TLS_CERT": str(tls_paths.server_cert),
        "FEDGE_TLS_KEY": str(tls_paths.server_key),
        "FEDGE_EVAL_HOOK": "no_such_module_here:evaluate",
    }
    result = subprocess.run(
        [
            *(sys.executable, "-m", "fedge.shared.cli", "coordinator", "serve"),
            *("--data-dir", str(tmp_path), "--database-url", settings.database_url),
            *("--port", "0", "--workers", "2"),
        ],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 1, err
    assert "failed starts in a row, giving up" in err
    assert "listening on" not in result.stdout.decode()


@pytest.mark.parametrize("secret", ["url", "password"])
def test_workers_take_the_database_url_read_from_a_secret_file(tmp_path, monkeypatch, secret):
    """With FEDGE_DATABASE_URL_FILE (or _PASSWORD_FILE) in the environment, which workers
    inherit, a worker builds its settings from the supervisor's resolved URL without reading
    the file again (Settings refused URL plus URL file, and every worker exited at start)."""
    url = "postgresql+psycopg://fedge:pw-from-file@db.internal:5432/fedge"
    if secret == "url":
        (tmp_path / "url").write_text(url + "\n")
        monkeypatch.setenv("FEDGE_DATABASE_URL_FILE", str(tmp_path / "url"))
    else:
        (tmp_path / "password").write_text("pw-from-file\n")
        monkeypatch.setenv("FEDGE_DATABASE_PASSWORD_FILE", str(tmp_path / "password"))
        monkeypatch.setenv(
            "FEDGE_DATABASE_URL", "postgresql+psycopg://fedge@db.internal:5432/fedge"
        )
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == url
    with socket.socket() as sock:
        supervisor = Supervisor(settings, sock, 2, forwarded_allow_ips=None, graceful_timeout_s=1)
        spec = json.loads(supervisor._spec(1, 0))
    worker = Settings(**spec["settings"])  # in the worker, with the same environment
    assert worker.database_url == url
    assert worker.instance_id == f"{settings.instance_id}-1"
