"""Pace steering and cheap check-ins for large fleets (docs/protocol.md, "Pace steering").

A fleet of at least ``settings.pace_min_fleet`` enrolled active devices is *paced*: a work
poll without ``current`` answers at once instead of being held, and an answer without work
carries ``Fedge-Reconnect: <seconds>``, the time the device sleeps (holding no connection)
before it checks in again; so does an accepted upload's answer without a next assignment
(:func:`upload_reconnect`). Smaller fleets keep the long-poll (rounds start within a second).

The period ``T`` (:func:`period_s`) is chosen so that the running rounds find their devices:
they need ``D = sum(ceil(clients_per_round * (1 + over_selection)))`` devices over their sync
tasks (plus ``max_concurrency`` per async task) within a selection window ``W``
(``pace_window_s``); with ``N`` devices each checking in once per ``T``, ``N * W / T``
devices check in per window, so ``T = N * W / (safety * D)``, clamped to
``[pace_min_s, pace_max_s]`` (no demand: ``pace_max_s``). More demand, sooner check-ins.

Each device has one check-in slot per period, at a point of the period derived from its id
and the period's index (:func:`~fedge.coordinator.engine.rotation.slot`): uniform over the
fleet (no herd), new every period (the devices that check in during one round's window are
not the same ones next time), and a function of the wall clock and the device only, so a
restarted coordinator hands out the same slots as before and the devices it finds sleeping
keep their times. The coordinator therefore
knows when a device it paced will come back (:func:`next_checkin`), which round formation
uses (:func:`fedge.coordinator.engine.rotation.choose_paced`).

An idle check-in costs one signature verification on the event loop and a place in a group
commit (:class:`CheckinBatcher`): the check-ins that arrive within ``checkin_batch_s`` record
their nonces, ``last_seen_at`` and the look-up of assignments waiting for them in one
transaction, and each is answered after that transaction committed. So replay protection is
exactly the database's (the nonce's unique row decides, across processes and restarts), at
a few statements per batch instead of a write transaction per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, Insert, bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from fedge.coordinator.auth import RequestClaim
from fedge.coordinator.db import READ_ONLY, in_states, utcnow, write_connection
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.longpoll import check_work
from fedge.coordinator.engine.rotation import next_checkin
from fedge.coordinator.errors import Unauthorized
from fedge.coordinator.models import Assignment, Device, Task, UsedNonce
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.coordinator.states import ASSIGNMENT_ACTIVE, DeviceStatus, TaskStatus

log = logging.getLogger(__name__)

#: The header of a paced answer without work: whole seconds until the next check-in.
RECONNECT_HEADER = "Fedge-Reconnect"
#: How long (seconds) a process trusts its reading of the fleet size and the demand.
REFRESH_S = 15.0
#: The most check-ins one group commit records.
MAX_BATCH = 500

Verdict = Literal["idle", "check", "replayed", "fallback"]


def period_s(settings: Settings, fleet: int, demand: float) -> float:
    """The check-in period of a fleet of ``fleet`` devices whose rounds need ``demand``
    devices per selection window (see the module docstring)."""
    if demand <= 0:
        return settings.pace_max_s
    wanted = fleet * settings.pace_window_s / (settings.pace_safety * demand)
    return float(min(settings.pace_max_s, max(settings.pace_min_s, wanted)))


@dataclass(frozen=True)
class PaceState:
    """One reading of what pacing depends on."""

    fleet: int
    demand: float
    async_running: bool
    period_s: float
    active: bool
    read_at: float  # monotonic


_FLEET = select(func.count()).select_from(Device).where(Device.status == DeviceStatus.ACTIVE)
_RUNNING = select(Task.id, Task.updated_at).where(Task.status == TaskStatus.RUNNING)


def read_state(runtime: Runtime, conn: Connection) -> PaceState:
    """Count the enrolled active devices and add up the running tasks' demand."""
    settings = runtime.settings
    fleet = int(conn.execute(_FLEET).scalar() or 0)
    demand = 0.0
    async_running = False
    for task_id, updated_at in conn.execute(_RUNNING).all():
        parsed = runtime.task_configs.lookup(conn, task_id, updated_at)
        cfg = parsed.config
        if cfg is None:
            continue
        if parsed.mode == "async":
            async_running = True
            demand += cfg.max_concurrency
        else:
            demand += cfg.num_selected
    return PaceState(
        fleet=fleet,
        demand=demand,
        async_running=async_running,
        period_s=period_s(settings, fleet, demand),
        active=fleet >= settings.pace_min_fleet,
        read_at=time.monotonic(),
    )


def _read_state(runtime: Runtime) -> PaceState:
    with runtime.engine.connect() as conn:
        conn = conn.execution_options(**READ_ONLY)
        state = read_state(runtime, conn)
        conn.rollback()
    return state


class Pacer:
    """A process's pacing: the current :class:`PaceState` and the check-in group commit."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.state: PaceState | None = None
        self._refreshing: asyncio.Future[PaceState] | None = None
        self.batcher = CheckinBatcher(runtime)

    async def current(self) -> PaceState:
        """The state, read again when older than :data:`REFRESH_S` (one reader at a time;
        the others keep using the previous reading meanwhile)."""
        state = self.state
        if state is not None and time.monotonic() - state.read_at < REFRESH_S:
            return state
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(run_in_threadpool(_read_state, self.runtime))
            self._refreshing.add_done_callback(self._refreshed)
        if state is not None:
            return state
        return await asyncio.shield(self._refreshing)

    def _refreshed(self, done: asyncio.Future[PaceState]) -> None:
        self._refreshing = None
        if not done.cancelled() and done.exception() is None:
            self.state = done.result()
        elif not done.cancelled():
            log.warning("reading the fleet size failed: %s", done.exception())

    def reconnect_s(self, state: PaceState, device_id: str, now: float | None = None) -> int:
        """Whole seconds from ``now`` (epoch) to the device's next slot, at least 1."""
        at = time.time() if now is None else now
        return max(1, math.ceil(next_checkin(device_id, at, state.period_s) - at))


def get_pacer(runtime: Runtime) -> Pacer:
    """The process's pacer (made on first use, on the event loop)."""
    if runtime.pacer is None:
        runtime.pacer = Pacer(runtime)
    return runtime.pacer


def paced_liveness(settings: Settings, state: PaceState | None) -> Liveness:
    """The liveness rule of the fleet: a paced device is reachable while seen within
    ``device_liveness_polls`` of the longest period (it may have been told to sleep that long
    before the demand rose); otherwise :meth:`Liveness.from_settings`."""
    base = Liveness.from_settings(settings)
    if state is None or not state.active:
        return base
    window = settings.device_liveness_polls * settings.pace_max_s
    return Liveness(
        polls=settings.device_liveness_polls,
        default_poll_s=settings.pace_max_s,
        max_window_s=window,
        paced_period_s=state.period_s,
        paced_window_s=settings.pace_window_s,
        fixed_window=True,
    )


#: How old a reading the scheduler uses at most: a round picks devices by their slots under
#: the current period, which a task that just started has changed.
SCHEDULER_REFRESH_S = 2.0


def liveness_for(runtime: Runtime) -> Liveness:
    """The fleet's liveness rule for the scheduler (blocking: reads the pace state when this
    process's reading is older than :data:`SCHEDULER_REFRESH_S`)."""
    pacer = get_pacer(runtime)
    state = pacer.state
    if state is None or time.monotonic() - state.read_at >= min(REFRESH_S, SCHEDULER_REFRESH_S):
        state = _read_state(runtime)
        pacer.state = state
    return paced_liveness(runtime.settings, state)


@dataclass(frozen=True)
class PacedAnswer:
    """A paced check-in's outcome: the work found, else the headers of the 204."""

    found: dict[str, Any] | None
    headers: dict[str, str]


async def paced_checkin(
    runtime: Runtime, device_id: str, claim: RequestClaim | None
) -> PacedAnswer | None:
    """A work poll without ``current`` of a paced fleet: the group-committed check-in, then,
    only when an assignment waits for the device (or it is not active any more, or the batch
    failed), the ordinary work check without a wait. ``None`` when the fleet is not paced
    (the caller long-polls as before). A replayed nonce raises 401 ``replayed_nonce``."""
    if claim is None:
        return None
    pacer = get_pacer(runtime)
    state = await pacer.current()
    if not state.active:
        return None
    found: dict[str, Any] | None = None
    verdict: Verdict = "check" if state.async_running else "idle"
    if verdict == "idle":
        verdict = await pacer.batcher.checkin(claim)
    if verdict == "replayed":
        raise Unauthorized(
            "this nonce was already used; sign every request with a fresh nonce",
            code="replayed_nonce",
        )
    if verdict != "idle":
        # Any running async task may hand an idle device work, so it takes the work check.
        found = await run_in_threadpool(
            check_work, runtime, device_id, None, None if claim.recorded else claim
        )
    if found is not None:
        return PacedAnswer(found, {})
    return PacedAnswer(None, _reconnect_headers(pacer, state, device_id))


def _reconnect_headers(pacer: Pacer, state: PaceState, device_id: str) -> dict[str, str]:
    return {RECONNECT_HEADER: str(pacer.reconnect_s(state, device_id))}


async def upload_reconnect(runtime: Runtime, device_id: str) -> dict[str, str]:
    """The headers of an accepted upload's answer that carries no next assignment: in a
    paced fleet ``Fedge-Reconnect``, the time to the device's next slot as an idle check-in
    is told, so the device sleeps instead of checking in right after its upload (a round's
    cohort would otherwise come back together, a training time after it was selected).
    Nothing in a fleet that long-polls."""
    pacer = get_pacer(runtime)
    state = await pacer.current()
    return _reconnect_headers(pacer, state, device_id) if state.active else {}


# -- the group commit of idle check-ins -----------------------------------------------------


def _nonces_statement(dialect: str) -> Insert:
    values = {
        "device_id": bindparam("p_device"),
        "nonce": bindparam("p_nonce"),
        "expires_at": bindparam("p_expires", type_=UsedNonce.__table__.c.expires_at.type),
    }
    now = bindparam("p_now", type_=UsedNonce.__table__.c.expires_at.type)
    ins = postgresql.insert(UsedNonce) if dialect == "postgresql" else sqlite.insert(UsedNonce)
    stmt = ins.values(values).on_conflict_do_update(
        index_elements=[UsedNonce.device_id, UsedNonce.nonce],
        set_={"expires_at": ins.excluded.expires_at},
        where=UsedNonce.expires_at < now,
    )
    return stmt.returning(UsedNonce.device_id, UsedNonce.nonce)


_LOCKED_ACTIVE = (
    select(Device.id)
    .where(Device.id.in_(bindparam("p_ids", expanding=True)), Device.status == DeviceStatus.ACTIVE)
    .order_by(Device.id)
    .with_for_update(key_share=True)
)
_SEEN = (
    update(Device)
    .where(Device.id.in_(bindparam("p_ids", expanding=True)))
    .values(last_seen_at=bindparam("p_seen", type_=Device.__table__.c.last_seen_at.type))
)
_BUSY = select(Assignment.device_id).where(
    Assignment.device_id.in_(bindparam("p_ids", expanding=True)),
    in_states(Assignment.status, ASSIGNMENT_ACTIVE),
)


@dataclass
class _Pending:
    claim: RequestClaim
    future: asyncio.Future[Verdict]


def record_checkins(
    runtime: Runtime, claims: Sequence[RequestClaim], *, now: datetime
) -> list[Verdict]:
    """One transaction for a batch of idle check-ins (blocking): insert their nonces (a
    nonce in use, or twice in the batch, is ``replayed``), set ``last_seen_at`` of the
    enrolled active devices among the rest (row-locked in id order, where the engine's lock
    order puts device rows), and find which of them have an assignment waiting (``check``:
    the request then runs the ordinary work check). A device that is not active any more is
    ``check`` as well, and that check refuses it. The rest are ``idle``."""
    verdicts: list[Verdict] = ["replayed"] * len(claims)
    rows: list[dict[str, object]] = []
    first: dict[tuple[str, str], int] = {}
    for i, claim in enumerate(claims):
        key = (claim.device_id, claim.nonce)
        if key in first:
            continue
        first[key] = i
        rows.append(
            {
                "p_device": claim.device_id,
                "p_nonce": claim.nonce,
                "p_expires": now + claim.ttl,
                "p_now": now,
            }
        )
    with write_connection(runtime.engine) as conn:
        if claims and claims[0].authenticator._prune_due():
            conn.execute(delete(UsedNonce).where(UsedNonce.expires_at < now))
        stmt = _nonces_statement(conn.dialect.name)
        fresh = {tuple(row) for row in conn.execute(stmt, rows).all()} if rows else set()
        ids = sorted({device for device, _ in fresh})
        active: set[str] = set()
        busy: set[str] = set()
        if ids:
            active = set(conn.execute(_LOCKED_ACTIVE, {"p_ids": ids}).scalars())
            if active:
                conn.execute(_SEEN, {"p_ids": sorted(active), "p_seen": now})
                busy = set(conn.execute(_BUSY, {"p_ids": sorted(active)}).scalars())
    for key, i in first.items():
        if key in fresh:
            device = key[0]
            verdicts[i] = "idle" if device in active and device not in busy else "check"
    return verdicts


class CheckinBatcher:
    """Collects the idle check-ins of ``checkin_batch_s`` (at most :data:`MAX_BATCH`) and
    records them with :func:`record_checkins` in one worker-thread call."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0  # for tests and diagnostics
        self.checkins = 0

    async def checkin(self, claim: RequestClaim) -> Verdict:
        """The check-in's verdict once its batch committed (``fallback``: the batch failed,
        the request records its own claim the ordinary way)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Verdict] = loop.create_future()
        self._pending.append(_Pending(claim, future))
        if len(self._pending) >= MAX_BATCH:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.runtime.settings.checkin_batch_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.checkins += len(batch)
        claims = [p.claim for p in batch]
        verdicts: list[Verdict]
        try:
            verdicts = await run_in_threadpool(record_checkins, self.runtime, claims, now=utcnow())
        except Exception:
            log.exception("recording a batch of check-ins failed")
            verdicts = ["fallback"] * len(batch)
        for pending, verdict in zip(batch, verdicts, strict=True):
            if verdict in ("idle", "check", "replayed"):
                pending.claim.recorded = True
            if not pending.future.done():
                pending.future.set_result(verdict)
