"""The device API: enrollment (unsigned), the device's own record, model download.

Every route but enrollment depends on ``DeviceDep`` (a verified signed request). The work
long-poll, update upload and metrics live in :mod:`fedge.coordinator.api.device_work`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.api.deps import (
    BlobsDep,
    DeviceDep,
    RuntimeDep,
    SessionDep,
    parse_signed_json,
)
from fedge.coordinator.api.devices import to_public
from fedge.coordinator.api.model_versions import (
    MODEL_RESPONSES,
    Dtype,
    IfNoneMatch,
    VersionRef,
    find_version,
    version_response,
)
from fedge.coordinator.api.signals import kick_scheduler
from fedge.coordinator.api.tasks import TaskId, get_task
from fedge.coordinator.db import utcnow
from fedge.coordinator.engine.downloads import delta_chain, mark_downloaded
from fedge.coordinator.engine.eligibility import merged_capabilities
from fedge.coordinator.enrollment import enroll_device
from fedge.coordinator.errors import Forbidden, NotFound, error_responses
from fedge.coordinator.models import Assignment, Device
from fedge.coordinator.schemas.devices import DevicePublic, EnrollRequest, EnrollResponse
from fedge.coordinator.schemas.targeting import CapabilitiesReport
from fedge.shared.modelspec import ModelSpec

router = APIRouter(prefix="/device", tags=["device"])

#: Errors every signed route can answer (see fedge.coordinator.auth).
SIGNED_ERRORS = (401, 403, 413, 429)


@router.post(
    "/enroll",
    status_code=201,
    response_model=EnrollResponse,
    summary="Enroll a device with an enrollment token and its Ed25519 public key",
    description="Repeating an enrollment (same token, same key), e.g. after a lost answer, "
    "answers 200 with the same device id and does not use the token again.",
    responses={
        200: {"model": EnrollResponse, "description": "A repeated enrollment"},
        **error_responses(400, 401, 409, 422),
    },
)
def enroll(body: EnrollRequest, session: SessionDep, response: Response) -> EnrollResponse:
    device, created = enroll_device(
        session,
        token=body.token,
        public_key=body.public_key,
        name=body.name,
        capabilities=body.capabilities,
        tags=body.tags,
    )
    if not created:
        response.status_code = 200
    return EnrollResponse(device_id=device.id, name=device.name, enrolled_at=device.enrolled_at)


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:  # deleted between verification and now
        raise NotFound(f"no device {device_id}")
    return device


@router.put(
    "/capabilities",
    response_model=DevicePublic,
    summary="Report what the device can do (trainers, data shape, poll interval)",
    description="Replaces the device's previous report (fields left out are forgotten; keys "
    "given at enrollment stay). Tasks' requirements are matched against it, and a device "
    "that declined a task is offered it again only after a new report (docs/rounds.md, "
    "'Eligibility').",
    responses=error_responses(*SIGNED_ERRORS, 404, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CapabilitiesReport.model_json_schema()}},
        }
    },
)
def report_capabilities(
    device: DeviceDep, session: SessionDep, runtime: RuntimeDep, background: BackgroundTasks
) -> DevicePublic:
    report = parse_signed_json(CapabilitiesReport, device.body)
    row = _device(session, device.id)
    row.capabilities = merged_capabilities(row.capabilities, report.model_dump(mode="json"))
    row.capabilities_at = utcnow()
    session.flush()
    background.add_task(kick_scheduler, runtime)
    return to_public(row)


@router.get(
    "/me",
    response_model=DevicePublic,
    summary="The calling device's own record",
    responses=error_responses(*SIGNED_ERRORS, 404),
)
def me(device: DeviceDep, session: SessionDep) -> DevicePublic:
    return to_public(_device(session, device.id))


Have = Annotated[
    int | None,
    Query(
        ge=0,
        le=999_999_999,
        description="The version whose broadcast model the device holds: the answer may then "
        "be the chain of compressed deltas from it (docs/wire-format.md, model deltas)",
    ),
]
Held = Annotated[
    str | None,
    Query(
        pattern="^[0-9a-f]{16}$",
        description="With `have`: the first 16 hex digits of the SHA-256 of the model the "
        "device holds as that version (one it generated rather than downloaded); when they "
        "are not the broadcast model's, the answer is the full model, not a chain",
    ),
]


@router.get(
    "/tasks/{task_id}/models/{version}",
    response_class=Response,
    summary="Download a model of a task the device has an assignment for",
    description="The broadcast model of the version (the full model, or with `have` the "
    "chain of compressed deltas from the version the device holds when that is smaller). "
    "The first download of an assignment's base model marks it `downloaded`. A chain "
    "through a version pruned by the retention policy is replaced by the full model; a "
    "pruned version itself answers 410 `version_pruned`.",
    responses={**MODEL_RESPONSES, **error_responses(*SIGNED_ERRORS, 404, 410, 422)},
)
def download_model(
    task_id: TaskId,
    version: VersionRef,
    device: DeviceDep,
    session: SessionDep,
    blobs: BlobsDep,
    dtype: Dtype = "f32",
    if_none_match: IfNoneMatch = None,
    have: Have = None,
    held: Held = None,
) -> Response:
    mine = select(Assignment.id).where(
        Assignment.task_id == task_id, Assignment.device_id == device.id
    )
    if session.scalar(mine.limit(1)) is None:
        raise Forbidden(
            f"device {device.id} has no assignment for task {task_id}", code="not_your_assignment"
        )
    task = get_task(session, task_id)
    row = find_version(session, task_id, version)
    chain = None
    # ``held``: the device's own model of version ``have`` must be the broadcast one.
    if (
        have is not None
        and have < row.version
        and dtype == "f32"
        and (held is None or find_version(session, task_id, str(have)).served_digest[:16] == held)
    ):
        chain = delta_chain(session, blobs, task_id, have, row)
    if chain is not None:
        response = Response(
            content=chain,
            media_type="application/octet-stream",
            headers={"Cache-Control": "private, no-store"},
        )
    else:
        response = version_response(
            session,
            blobs,
            row,
            row.served_digest,
            ModelSpec.from_dict(task.model_spec),
            dtype=dtype,
            if_none_match=if_none_match,
        )
    mark_downloaded(session, task_id=task_id, device_id=device.id, version=row.version)
    return response
