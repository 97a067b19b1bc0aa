"""The device's work cycle: the work long-poll, update upload and metrics.

Every route depends on ``DeviceDep`` (a verified signed request; the body was read with the
``max_upload_bytes`` limit enforced while it streamed in and is part of the signature). The
database work runs in worker threads with short transactions of its own; the long-poll waits
on an in-process signal holding no session or connection (docs/protocol.md).

A long-poll checks the database on arrival with its own check. While it waits, its re-checks
(every ``long_poll_recheck_s``, for changes made by other coordinator processes) and its
wake-ups are batched: the waits end on a clock shared by every poll, and every poll that
wakes in the same event-loop turn is checked in one :func:`coordinator.engine.work.
check_waiting` call, so a thousand idle devices cost a few queries per re-check instead of a
thousand, and a round opened for all of them is answered from one query. A poll whose batch
verdict is anything but its active assignment or "nothing new" runs its own check as before.

A device may keep ``device_max_long_polls`` polls with a wait open (besides its cap on
requests in flight, :class:`coordinator.auth.DeviceSlots`); one more is refused at once with
429 ``too_many_requests`` and ``Retry-After``, before its first check. The slot is taken after
the request was verified, so nobody but the device itself can use up its polls.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, ValidationError

from coordinator.api.deps import MAX_ID, DeviceDep, RuntimeDep
from coordinator.auth import get_device_slots
from coordinator.db import session_scope, utcnow
from coordinator.engine.lifecycle import NOTIFIER_KEY, SCHEDULER_KEY
from coordinator.engine.notify import Notifier
from coordinator.engine.reports import record_metrics
from coordinator.engine.updates import accept_upload, check_idempotency_key
from coordinator.engine.work import (
    Verdict,
    cancellation,
    check_waiting,
    find_work,
    require_active,
)
from coordinator.errors import Unprocessable, error_responses
from coordinator.runtime import Runtime
from coordinator.schemas.common import Strict
from coordinator.states import AssignmentStatus, UpdateStatus

router = APIRouter(prefix="/device", tags=["device"])
log = logging.getLogger(__name__)
_CHECKER_KEY = "work_batch_checker"

SIGNED_ERRORS = (401, 403, 413, 429)

AssignmentId = Annotated[int, Path(ge=1, le=MAX_ID, description="Assignment id")]


class WorkAssignment(BaseModel):
    assignment_id: int
    status: AssignmentStatus
    task_id: int
    round_id: int
    mode: Literal["sync", "async"]
    base_version: int
    deadline: datetime | None = Field(description="When the assignment's lease ends")
    model_url: str
    upload_url: str
    compression: dict[str, Any]
    training: dict[str, Any]
    model: dict[str, Any]
    spec: list[dict[str, Any]]


class WorkCancelled(BaseModel):
    assignment_id: int
    status: Literal[AssignmentStatus.CANCELLED]
    reason: str
    task_id: int
    round_id: int
    base_version: int


class UploadAccepted(BaseModel):
    update_id: int
    assignment_id: int
    task_id: int
    base_version: int
    staleness: int
    weight: float
    status: UpdateStatus
    duplicate: bool
    num_examples_counted: int = Field(
        description="How many of the claimed examples the weight counts (the claim, bounded "
        "by the task's rules; docs/rounds.md, 'Update bounds')"
    )


class DeviceMetrics(Strict):
    """What a device reports about its training and local evaluation (all optional)."""

    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    num_eval_examples: int | None = Field(default=None, ge=0, le=2**62)
    train_time_s: float | None = Field(default=None, ge=0.0)


def get_notifier(runtime: Runtime) -> Notifier | None:
    notifier = runtime.extras.get(NOTIFIER_KEY)
    return notifier if isinstance(notifier, Notifier) else None


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
    existing = runtime.extras.get(_CHECKER_KEY)
    if isinstance(existing, BatchChecker):
        return existing
    created = runtime.extras.setdefault(_CHECKER_KEY, BatchChecker(runtime))
    assert isinstance(created, BatchChecker)
    return created


def _next_tick(now: float, period: float) -> float:
    """The next multiple of ``period`` on the loop clock: every poll re-checks at once."""
    return (math.floor(now / period) + 1) * period


def _check_work(runtime: Runtime, device_id: str, current: int | None) -> dict[str, Any] | None:
    with session_scope(runtime.sessions) as session:
        if current is not None:
            stopped = cancellation(session, device_id=device_id, assignment_id=current)
            if stopped is not None:
                return stopped
        require_active(session, device_id)
        if current is not None:
            return None
        return find_work(session, device_id=device_id, now=utcnow())


@router.get(
    "/work",
    response_model=WorkAssignment | WorkCancelled,
    summary="Long-poll for work, or for the cancellation of the current assignment",
    responses={
        204: {"description": "Nothing within the wait"},
        **error_responses(*SIGNED_ERRORS, 404, 422),
    },
)
async def work(
    request: Request,
    device: DeviceDep,
    runtime: RuntimeDep,
    wait: Annotated[int, Query(ge=0, le=60, description="Seconds to wait for news")] = 0,
    current: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="The assignment being worked on")
    ] = None,
) -> Any:
    loop = asyncio.get_running_loop()
    wait_s = min(wait, runtime.settings.long_poll_max_s)
    deadline = loop.time() + wait_s
    recheck = runtime.settings.long_poll_recheck_s
    notifier = get_notifier(runtime)
    if notifier is None:  # no lifespan engine (should not happen): plain re-checks
        notifier = Notifier(loop)
    checker = get_checker(runtime)
    # A check without a wait holds nothing for long and needs no long-poll slot.
    slot: AbstractContextManager[None] = (
        get_device_slots(runtime).long_poll(device.id) if wait_s > 0 else nullcontext()
    )
    with slot, notifier.subscribe(device.id) as sub:
        own_check = True
        while True:
            if own_check:
                found = await run_in_threadpool(_check_work, runtime, device.id, current)
                if found is not None:
                    return found
            remaining = deadline - loop.time()
            if remaining <= 0 or await request.is_disconnected():
                # A device that went away stops costing a database check per re-check.
                return Response(status_code=204)
            now = loop.time()
            await sub.wait(min(remaining, _next_tick(now, recheck) - now))
            verdict, payload = await checker.check(device.id, current)
            if verdict == "found":
                return payload
            own_check = verdict == "check"


@router.post(
    "/assignments/{assignment_id}/update",
    status_code=201,
    response_model=UploadAccepted,
    summary="Upload the update (binary wire format) of an assignment",
    responses={
        200: {"model": UploadAccepted, "description": "Repeated Idempotency-Key: first result"},
        **error_responses(*SIGNED_ERRORS, 400, 404, 409, 422),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_update(
    device: DeviceDep,
    runtime: RuntimeDep,
    assignment_id: AssignmentId,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", description="1..128 of [A-Za-z0-9_.-]")
    ] = None,
) -> UploadAccepted:
    key = check_idempotency_key(idempotency_key)
    result = await run_in_threadpool(
        accept_upload,
        runtime,
        device_id=device.id,
        assignment_id=assignment_id,
        key=key,
        body=device.body,
    )
    if result.duplicate:
        response.status_code = 200
    else:
        scheduler = runtime.extras.get(SCHEDULER_KEY)
        if scheduler is not None:
            scheduler.kick()
    return UploadAccepted(**result.to_dict())


def _store_metrics(
    runtime: Runtime, device_id: str, assignment_id: int, metrics: dict[str, Any]
) -> None:
    with session_scope(runtime.sessions) as session:
        record_metrics(session, device_id=device_id, assignment_id=assignment_id, metrics=metrics)


@router.post(
    "/assignments/{assignment_id}/metrics",
    status_code=204,
    summary="Report training and local evaluation metrics of an assignment",
    responses=error_responses(*SIGNED_ERRORS, 404, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": DeviceMetrics.model_json_schema()}},
        }
    },
)
async def report_metrics(
    device: DeviceDep, runtime: RuntimeDep, assignment_id: AssignmentId
) -> Response:
    try:
        body = DeviceMetrics.model_validate_json(device.body or b"{}")
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        message = errors[0]["msg"] if errors else "invalid metrics"
        raise Unprocessable(f"{where or 'body'}: {message}") from None
    metrics = body.model_dump(exclude_none=True)
    await run_in_threadpool(_store_metrics, runtime, device.id, assignment_id, metrics)
    return Response(status_code=204)
