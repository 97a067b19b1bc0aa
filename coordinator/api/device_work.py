"""The device's work cycle: the work long-poll, update upload and metrics.

Every route depends on ``DeviceDep`` (a verified signed request; the body was read with the
``max_upload_bytes`` limit enforced while it streamed in and is part of the signature). The
database work runs in worker threads with short transactions of its own; the long-poll
(:mod:`fedge.coordinator.engine.longpoll`) waits on an in-process signal holding no session or
connection (docs/protocol.md).

A device may keep ``device_max_long_polls`` polls with a wait open (besides its cap on
requests in flight, :class:`fedge.coordinator.auth.DeviceSlots`); one more is refused at once with
429 ``too_many_requests`` and ``Retry-After``, before its first check. The slot is taken after
the request was verified, so nobody but the device itself can use up its polls.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from fedge.coordinator.api.deps import (
    MAX_ID,
    DeviceClaimDep,
    DeviceDep,
    RuntimeDep,
    parse_signed_json,
)
from fedge.coordinator.auth import DeviceIdentity, RequestClaim, get_device_slots
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine.declines import decline_assignment
from fedge.coordinator.engine.downloads import inline_chain
from fedge.coordinator.engine.longpoll import long_poll, next_assignment
from fedge.coordinator.engine.pace import paced_checkin, upload_reconnect
from fedge.coordinator.engine.reports import record_metrics
from fedge.coordinator.engine.updates import (
    InTransaction,
    accept_upload_ready,
    check_idempotency_key,
)
from fedge.coordinator.engine.work import find_work, without_known_config
from fedge.coordinator.errors import error_responses
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.device_work import (
    DeviceMetrics,
    UploadAccepted,
    UploadReceipt,
    WorkAssignment,
    WorkCancelled,
)
from fedge.coordinator.schemas.targeting import DeclinePublic, DeclineRequest
from fedge.shared.wire_delta import WORK_FRAME_MEDIA_TYPE, encode_work_frame

router = APIRouter(prefix="/device", tags=["device"])

SIGNED_ERRORS = (401, 403, 413, 429)

#: The patterns of the ``known`` and ``have`` query parameters.
KNOWN_PATTERN = "^[0-9a-f]{16}$"
HAVE_PATTERN = r"^[0-9]{1,9}\.[0-9]{1,9}$"

AssignmentId = Annotated[int, Path(ge=1, le=MAX_ID, description="Assignment id")]
KnownQuery = Annotated[
    str | None,
    Query(
        pattern=KNOWN_PATTERN,
        description="The `config_digest` of the task configuration the device holds: an "
        "answer for that configuration leaves it out",
    ),
]
HaveQuery = Annotated[
    str | None,
    Query(
        pattern=HAVE_PATTERN,
        description="`<task>.<version>`: the broadcast model the device holds; an answer "
        "on a newer version of that task may carry the delta chain to it",
    ),
]


@router.get(
    "/work",
    response_model=WorkAssignment | WorkCancelled,
    response_model_exclude_none=True,
    summary="Long-poll for work, or for the cancellation of the current assignment",
    responses={
        200: {
            "content": {
                WORK_FRAME_MEDIA_TYPE: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "With `have`: the assignment's JSON followed by the delta "
                    "chain to its base model (docs/protocol.md, 'Work long-poll')",
                }
            }
        },
        204: {"description": "Nothing within the wait"},
        **error_responses(*SIGNED_ERRORS, 404, 422),
    },
)
async def work(
    request: Request,
    device: DeviceClaimDep,
    runtime: RuntimeDep,
    wait: Annotated[int, Query(ge=0, le=60, description="Seconds to wait for news")] = 0,
    current: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="The assignment being worked on")
    ] = None,
    known: KnownQuery = None,
    have: HaveQuery = None,
) -> Any:
    paced = await paced_checkin(runtime, device.id, device.claim) if current is None else None
    if paced is not None:  # a paced fleet: answered at once (docs/protocol.md, "Pace steering")
        found = paced.found
        if found is None:
            return Response(status_code=204, headers=paced.headers)
    else:
        found = await _long_poll(request, runtime, device, current, wait)
        if found is None:
            return Response(status_code=204)
    if have is not None and current is None:
        task_id, version = _task_version(have)
        chain = await run_in_threadpool(inline_chain, runtime, device.id, found, (task_id, version))
        if chain is not None:
            answer = {**without_known_config(found, known), "model_delta_from": version}
            body = WorkAssignment.model_validate(answer).model_dump_json(exclude_none=True)
            return Response(
                content=encode_work_frame(body.encode(), chain), media_type=WORK_FRAME_MEDIA_TYPE
            )
    return without_known_config(found, known)


@router.post(
    "/assignments/{assignment_id}/update",
    status_code=201,
    response_model=UploadAccepted | UploadReceipt,
    summary="Upload the update (binary wire format) of an assignment",
    description="With `Prefer: return=minimal` (RFC 7240) the answer is only "
    '`{"update_id", "staleness", "duplicate"}` (`UploadReceipt`), what an agent needs, '
    "in a third of the bytes. With `next=1` it also carries the device's next assignment "
    "(`next`) when one is there at once, and with `have` the delta chain to its base model "
    "after the JSON (a work frame, as the work poll's).",
    responses={
        201: {
            "content": {
                WORK_FRAME_MEDIA_TYPE: {
                    "schema": {"type": "string", "format": "binary"},
                }
            },
            "description": "Accepted. With `next=1` and `have`: the answer's JSON followed by "
            "the delta chain to the next assignment's base model (docs/protocol.md)",
        },
        200: {
            "model": UploadAccepted | UploadReceipt,
            "description": "Repeated Idempotency-Key: first result",
        },
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
    device: DeviceClaimDep,
    runtime: RuntimeDep,
    assignment_id: AssignmentId,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", description="1..128 of [A-Za-z0-9_.-]")
    ] = None,
    prefer: Annotated[
        str | None, Header(description="`return=minimal`: answer `UploadReceipt` only")
    ] = None,
    next_work: Annotated[
        bool,
        Query(
            alias="next",
            description="Answer the device's next assignment too (`next`), when one is there "
            "at once: one request per update instead of two (docs/protocol.md, 'Upload')",
        ),
    ] = False,
    known: KnownQuery = None,
    have: HaveQuery = None,
) -> Response:
    return await upload_response(
        runtime,
        device,
        assignment_id,
        idempotency_key=idempotency_key,
        prefer=prefer,
        next_work=next_work,
        known=known,
        have=have,
    )


async def upload_response(
    runtime: Runtime,
    device: DeviceIdentity,
    assignment_id: int,
    *,
    idempotency_key: str | None,
    prefer: str | None,
    next_work: bool,
    known: str | None,
    have: str | None,
) -> Response:
    """The upload route's work once its parameters are checked: shared by the FastAPI route
    above and the direct route of :mod:`fedge.coordinator.api.upload_route`."""
    key = check_idempotency_key(idempotency_key)
    result, ready, found = await run_in_threadpool(
        _upload_and_next,
        runtime,
        device_id=device.id,
        assignment_id=assignment_id,
        key=key,
        body=device.body,
        claim=device.claim,
        next_work=next_work,
    )
    if ready and runtime.scheduler is not None:
        runtime.scheduler.kick()
    status = 200 if result.duplicate else 201
    minimal = prefer is not None and "return=minimal" in prefer.replace(" ", "").split(",")
    answer: UploadAccepted | UploadReceipt = (
        UploadReceipt.model_validate(result, from_attributes=True) if minimal else result
    )
    chain: bytes | None = None
    if found is not None:
        payload = without_known_config(found, known)
        if have is not None:
            chain = await run_in_threadpool(
                inline_chain, runtime, device.id, found, _task_version(have)
            )
            if chain is not None:
                payload = {**payload, "model_delta_from": _task_version(have)[1]}
        answer.next = WorkAssignment.model_validate(payload)
    body = answer.model_dump_json(exclude_none=True).encode()
    if chain is not None:
        return Response(
            encode_work_frame(body, chain), status_code=status, media_type=WORK_FRAME_MEDIA_TYPE
        )
    # Without a next assignment a paced device is told when to check in (docs/protocol.md).
    headers = await upload_reconnect(runtime, device.id) if found is None else None
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _long_poll(
    request: Request, runtime: Runtime, device: DeviceIdentity, current: int | None, wait: int
) -> dict[str, Any] | None:
    wait_s = min(wait, runtime.settings.long_poll_max_s)
    # A check without a wait holds nothing for long and needs no long-poll slot.
    slot: AbstractContextManager[None] = (
        get_device_slots(runtime).long_poll(device.id) if wait_s > 0 else nullcontext()
    )
    waiters = runtime.metrics.long_poll_waiters if runtime.metrics and wait_s > 0 else None
    with slot, waiters.track_inprogress() if waiters is not None else nullcontext():
        return await long_poll(
            runtime,
            device.id,
            current,
            wait_s=wait_s,
            disconnected=request.is_disconnected,
            claim=device.claim,
        )


def _task_version(have: str) -> tuple[int, int]:
    task_id, version = (int(part) for part in have.split("."))
    return task_id, version


def _upload_and_next(
    runtime: Runtime,
    *,
    device_id: str,
    assignment_id: int,
    key: str,
    body: bytes,
    claim: RequestClaim | None,
    next_work: bool,
) -> tuple[UploadAccepted, bool, dict[str, Any] | None]:
    """The upload (:func:`accept_upload_ready`), then with ``next_work`` the device's next
    assignment as a work check without a wait would find it, in one worker-thread call. On
    SQLite the next assignment is found in the upload's own write transaction (in a savepoint:
    one commit, and one turn of the database's single write lock, instead of two); on
    PostgreSQL, whose upload holds the task row ``FOR SHARE`` while an assignment takes it in
    another order, in a short write transaction of its own after the upload's commit."""
    also = (
        InTransaction(
            lambda conn: find_work(conn, runtime.task_configs, device_id=device_id, now=utcnow())
        )
        if next_work and runtime.engine.dialect.name == "sqlite"
        else None
    )
    result, ready = accept_upload_ready(
        runtime,
        device_id=device_id,
        assignment_id=assignment_id,
        key=key,
        body=body,
        claim=claim,
        also=also,
    )
    if also is not None and also.ran:
        if also.error is not None:
            raise also.error
        return result, ready, also.result
    found = next_assignment(runtime, device_id) if next_work else None
    return result, ready, found


def _decline(runtime: Runtime, device_id: str, assignment_id: int, body: DeclineRequest) -> Any:
    with session_scope(runtime.sessions) as session:
        return decline_assignment(
            session,
            device_id=device_id,
            assignment_id=assignment_id,
            reason=body.reason,
            detail=body.detail,
            now=utcnow(),
        )


@router.post(
    "/assignments/{assignment_id}/decline",
    response_model=DeclinePublic,
    summary="Decline an assignment the device cannot work on, with a reason",
    description="The assignment ends at once (`cancelled`, the reason kept) and a sync round "
    "selects a replacement instead of waiting for its deadline. A repeated decline answers "
    "the first; an assignment that already ended otherwise answers 409 `assignment_ended` "
    "(docs/protocol.md, 'Decline').",
    responses=error_responses(*SIGNED_ERRORS, 404, 409, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": DeclineRequest.model_json_schema()}},
        }
    },
)
async def decline(device: DeviceDep, runtime: RuntimeDep, assignment_id: AssignmentId) -> Any:
    body = parse_signed_json(DeclineRequest, device.body)
    result = await run_in_threadpool(_decline, runtime, device.id, assignment_id, body)
    if not result.duplicate and runtime.scheduler is not None:
        runtime.scheduler.kick()
    return DeclinePublic(
        assignment_id=result.assignment_id,
        device_id=device.id,
        task_id=result.task_id,
        round_id=result.round_id,
        round_number=result.round_number,
        reason=result.reason,
        detail=result.detail,
        declined_at=result.declined_at,
    )


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
    body = parse_signed_json(DeviceMetrics, device.body)
    metrics = body.model_dump(exclude_none=True)
    await run_in_threadpool(_store_metrics, runtime, device.id, assignment_id, metrics)
    return Response(status_code=204)
