"""The work long-poll (``GET /device/work``): wait for work or for the cancellation of the
device's current assignment, holding no database session or connection while waiting.

A poll checks the database on arrival with its own check (:func:`check_work`). While it
waits, its re-checks (every ``long_poll_recheck_s``, for changes made by other coordinator
processes) and its wake-ups (the in-process :class:`~fedge.coordinator.engine.notify.Notifier`)
are batched: the waits end on a clock shared by every poll (:func:`next_tick`), and every
poll that wakes in the same event-loop turn is checked in one
:func:`fedge.coordinator.engine.work.check_waiting` call (:class:`BatchChecker`), so a thousand
idle devices cost a few queries per re-check instead of a thousand, and a round opened for
all of them is answered from one query. A poll whose batch verdict is anything but its active
assignment or "nothing new" runs its own check again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool

from fedge.coordinator.auth import RequestClaim, record_nonce, touch_device
from fedge.coordinator.db import session_scope, utcnow, write_connection
from fedge.coordinator.engine.notify import Notifier
from fedge.coordinator.engine.work import (
    Verdict,
    cancellation,
    check_waiting,
    find_work,
    require_active,
)
from fedge.coordinator.runtime import Runtime

log = logging.getLogger(__name__)


class BatchChecker:
    """Coalesces the checks of waiting long-polls: every check asked for in one event-loop
    turn goes to the database in a single worker-thread call."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._pending: list[tuple[str, int | None, asyncio.Future[Verdict]]] = []
        self.batches = 0  # for tests and diagnostics
        self.failures = 0  # batches that fell back to one check per poll

    async def check(self, device_id: str, current: int | None) -> Verdict:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Verdict] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start)  # after the other polls woken in this turn
        self._pending.append((device_id, current, future))
        return await future

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[str, int | None, asyncio.Future[Verdict]]]) -> None:
        self.batches += 1
        polls = [(d, c) for d, c, _ in batch]
        try:
            verdicts = await run_in_threadpool(_check_batch, self.runtime, polls)
        except Exception:  # every poll falls back to its own check
            self.failures += 1
            log.exception("batched long-poll check failed")
            verdicts = [("check", None)] * len(batch)
        for (_, _, future), verdict in zip(batch, verdicts, strict=True):
            if not future.done():
                future.set_result(verdict)


def _check_batch(runtime: Runtime, polls: list[tuple[str, int | None]]) -> list[Verdict]:
    with session_scope(runtime.sessions, read_only=True) as session:
        return check_waiting(session, polls)


def get_checker(runtime: Runtime) -> BatchChecker:
    """The process's batch checker (made on first use; the event loop is single-threaded)."""
    if runtime.batch_checker is None:
        runtime.batch_checker = BatchChecker(runtime)
    return runtime.batch_checker


def next_tick(now: float, period: float) -> float:
    """The next multiple of ``period`` on the loop clock: every poll re-checks at once."""
    return (math.floor(now / period) + 1) * period


def check_work(
    runtime: Runtime, device_id: str, current: int | None, claim: RequestClaim | None = None
) -> dict[str, Any] | None:
    """One poll's own check (blocking, SQLAlchemy Core, one write transaction): the
    cancellation of ``current``, else new work. With the request's ``claim`` (its first
    check) the nonce and ``last_seen_at`` are written in the same transaction (when the check
    fails, ``DeviceClaimDep`` records them on their own before the error is answered)."""
    now = utcnow()
    with write_connection(runtime.engine) as conn:
        if claim is not None:
            record_nonce(conn, claim, now=now)
        if current is not None:
            found = cancellation(conn, device_id=device_id, assignment_id=current)
            if claim is not None:
                touch_device(conn, device_id, now=now)
            elif found is None:
                require_active(conn, device_id)
        else:
            if claim is None:
                require_active(conn, device_id)
            found = find_work(
                conn,
                runtime.task_configs,
                device_id=device_id,
                now=now,
                seen=claim is not None,
            )
    if claim is not None:
        claim.recorded = True
    return found


def next_assignment(runtime: Runtime, device_id: str) -> dict[str, Any] | None:
    """The work a poll without a wait would find for the device now (blocking: one short
    write transaction), for an upload that asked for its next assignment. The request's
    nonce and ``last_seen_at`` were recorded by the upload."""
    with write_connection(runtime.engine) as conn:
        return find_work(conn, runtime.task_configs, device_id=device_id, now=utcnow())


async def long_poll(
    runtime: Runtime,
    device_id: str,
    current: int | None,
    *,
    wait_s: float,
    disconnected: Callable[[], Awaitable[bool]],
    claim: RequestClaim | None = None,
) -> dict[str, Any] | None:
    """The poll's answer, or ``None`` when nothing came within ``wait_s`` seconds or the
    client went away (``disconnected()`` is asked before each wait). ``claim``: the
    request's nonce and ``last_seen_at``, recorded by the first check."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    recheck = runtime.settings.long_poll_recheck_s
    notifier = runtime.notifier
    if notifier is None:  # no lifespan engine (should not happen): plain re-checks
        notifier = Notifier(loop)
    checker = get_checker(runtime)
    with notifier.subscribe(device_id) as sub:
        own_check = True
        while True:
            if own_check:
                found = await run_in_threadpool(check_work, runtime, device_id, current, claim)
                claim = None  # recorded by the first check
                if found is not None:
                    return found
            remaining = deadline - loop.time()
            if remaining <= 0 or notifier.draining or await disconnected():
                # A device that went away stops costing a database check per re-check; a
                # stopping process answers "nothing new" so the device polls again later.
                return None
            now = loop.time()
            await sub.wait(min(remaining, next_tick(now, recheck) - now))
            if notifier.draining:
                return None
            verdict, payload = await checker.check(device_id, current)
            if verdict == "found":
                return payload
            own_check = verdict == "check"
