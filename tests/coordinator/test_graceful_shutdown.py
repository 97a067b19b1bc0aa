"""SIGTERM while devices long-poll: a real ``fedge coordinator serve`` process over HTTPS
answers every waiting poll with the usual "nothing new" (204) at once, logs no traceback,
and exits 0 (before, the polls held the stop until the grace period ended and were then
cancelled: a CancelledError traceback in the log and a 500 for each device)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

from fedge.coordinator.models import UsedNonce
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.support.device import API
from tests.support.process import coordinator_process
from tests.support.rounds import Fleet, wait_until
from tests.support.rows import db_session

POLLS = 4


def nonces(settings: Settings) -> int:
    with db_session(settings) as session:
        return int(session.scalar(select(func.count()).select_from(UsedNonce)) or 0)


def test_sigterm_answers_waiting_long_polls_with_204_and_no_traceback(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    env = {"FEDGE_LOG_LEVEL": "info", "FEDGE_LONG_POLL_MAX_S": "60"}
    args = ["--graceful-timeout", "20"]
    with coordinator_process(
        settings, tmp_path / "proc", ca_file=tls_paths.ca_cert, env=env, args=args
    ) as proc:
        fleet = Fleet.enroll(proc, POLLS)
        answers: list[int | str] = []
        lock = threading.Lock()

        def poll(index: int) -> None:
            try:
                status: int | str = (
                    fleet[index].get(f"{API}/device/work", params={"wait": 50}).status_code
                )
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                answers.append(status)

        before = nonces(settings)
        threads = [threading.Thread(target=poll, args=(i,)) for i in range(POLLS)]
        for thread in threads:
            thread.start()
        # Each poll records its nonce in its first check, just before it starts waiting.
        wait_until(lambda: nonces(settings) == before + POLLS)
        started = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        answered = time.monotonic() - started
        # An agent's next poll finds its connection closing and drops it; these clients
        # just close theirs (the server's TLS shutdown waits for the peer).
        fleet.close()
        assert proc.process.wait(timeout=30) == 0
        elapsed = time.monotonic() - started
        log = proc.log()

    assert answers == [204] * POLLS, log
    assert answered < 5, f"the polls were answered after {answered:.1f} s\n{log}"
    assert elapsed < 15, f"the stop waited {elapsed:.1f} s for the long-polls\n{log}"
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "graceful shutdown exceeded" not in log, log
    assert "Exception in ASGI application" not in log, log
