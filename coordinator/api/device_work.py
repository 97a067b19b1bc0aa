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
from pydantic import ValidationError

from fedge.coordinator.api.deps import MAX_ID, DeviceClaimDep, DeviceDep, RuntimeDep
from fedge.coordinator.auth import get_device_slots
from fedge.coordinator.db import session_scope
from fedge.coordinator.engine.downloads import inline_chain
from fedge.coordinator.engine.longpoll import long_poll
from fedge.coordinator.engine.reports import record_metrics
from fedge.coordinator.engine.updates import accept_upload, check_idempotency_key
from fedge.coordinator.engine.work import without_known_config
from fedge.coordinator.errors import Unprocessable, error_responses
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.device_work import (
    DeviceMetrics,
    UploadAccepted,
    UploadReceipt,
    WorkAssignment,
    WorkCancelled,
)
from fedge.shared.wire_delta import WORK_FRAME_MEDIA_TYPE, encode_work_frame

router = APIRouter(prefix="/device", tags=["device"])

SIGNED_ERRORS = (401, 403, 413, 429)

AssignmentId = Annotated[int, Path(ge=1, le=MAX_ID, description="Assignment id")]


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
    known: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-f]{16}$",
            description="The `config_digest` of the task configuration the device holds: an "
            "answer for that configuration leaves it out",
        ),
    ] = None,
    have: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9]{1,9}\.[0-9]{1,9}$",
            description="`<task>.<version>`: the broadcast model the device holds; an answer "
            "on a newer version of that task may carry the delta chain to it",
        ),
    ] = None,
) -> Any:
    wait_s = min(wait, runtime.settings.long_poll_max_s)
    # A check without a wait holds nothing for long and needs no long-poll slot.
    slot: AbstractContextManager[None] = (
        get_device_slots(runtime).long_poll(device.id) if wait_s > 0 else nullcontext()
    )
    with slot:
        found = await long_poll(
            runtime,
            device.id,
            current,
            wait_s=wait_s,
            disconnected=request.is_disconnected,
            claim=device.claim,
        )
    if found is None:
        return Response(status_code=204)
    if have is not None and current is None:
        task_id, version = (int(part) for part in have.split("."))
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
    "in a third of the bytes.",
    responses={
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
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", description="1..128 of [A-Za-z0-9_.-]")
    ] = None,
    prefer: Annotated[
        str | None, Header(description="`return=minimal`: answer `UploadReceipt` only")
    ] = None,
) -> Any:
    key = check_idempotency_key(idempotency_key)
    result = await run_in_threadpool(
        accept_upload,
        runtime,
        device_id=device.id,
        assignment_id=assignment_id,
        key=key,
        body=device.body,
        claim=device.claim,
    )
    if not result.duplicate and runtime.scheduler is not None:
        runtime.scheduler.kick()
    status = 200 if result.duplicate else 201
    if prefer is not None and "return=minimal" in prefer.replace(" ", "").split(","):
        receipt = UploadReceipt.model_validate(result, from_attributes=True)
        return Response(
            receipt.model_dump_json(), status_code=status, media_type="application/json"
        )
    response.status_code = status
    return result


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
