"""The device endpoints of a secure-aggregation round (docs/secure-aggregation.md).

Signed device requests like every other device route; the messages are the binary layouts of
:mod:`fedge.shared.secagg.messages` (``application/octet-stream``). A device posts each message
once (the same bytes again: 200, a duplicate; different bytes: 409 ``message_differs``); a
``GET`` answers 425 ``phase_not_ready`` until the phase that produces what it asks for has
closed. The rules are in :mod:`fedge.coordinator.engine.secure_messages`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Path, Response
from sqlalchemy.orm import Session

from fedge.coordinator.api.deps import MAX_ID, DeviceDep, RuntimeDep, SessionDep
from fedge.coordinator.api.signals import kick_scheduler
from fedge.coordinator.auth import DeviceIdentity
from fedge.coordinator.db import utcnow
from fedge.coordinator.engine import secure_messages
from fedge.coordinator.errors import error_responses
from fedge.coordinator.runtime import Runtime

router = APIRouter(prefix="/device/secagg", tags=["device"])

SIGNED_ERRORS = (401, 403, 413, 429)
RoundId = Annotated[int, Path(ge=1, le=MAX_ID, description="Round id")]
BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/{round_id}/config",
    summary="The round's public secure-aggregation parameters and this device's index",
    responses=error_responses(*SIGNED_ERRORS, 404),
)
def config(device: DeviceDep, session: SessionDep, round_id: RoundId) -> dict[str, Any]:
    return secure_messages.config_of(session, device.id, round_id)


def _post(
    phase: str,
    device: DeviceIdentity,
    session: Session,
    runtime: Runtime,
    background: BackgroundTasks,
    round_id: int,
) -> Response:
    posted = secure_messages.post(
        session, device.id, round_id, phase, device.body or b"", now=utcnow()
    )
    if not posted.duplicate:
        background.add_task(kick_scheduler, runtime)
    return Response(
        f'{{"phase":"{posted.phase}","duplicate":{str(posted.duplicate).lower()}}}',
        status_code=200 if posted.duplicate else 201,
        media_type="application/json",
    )


_POST_DOC: dict[str, Any] = {
    "status_code": 201,
    "response_class": Response,
    "responses": {
        200: {"description": "The same message again (a duplicate)"},
        **error_responses(*SIGNED_ERRORS, 400, 404, 409, 422, 425),
    },
    "openapi_extra": {"requestBody": {"required": True, "content": BINARY}},
}
_GET_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {"content": BINARY},
        **error_responses(*SIGNED_ERRORS, 404, 409, 425),
    },
}


@router.post("/{round_id}/advert", summary="Post the signed key advertisement", **_POST_DOC)
def post_advert(
    device: DeviceDep,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    round_id: RoundId,
) -> Response:
    return _post("advert", device, session, runtime, background, round_id)


@router.post("/{round_id}/shares", summary="Post the sealed share bundles", **_POST_DOC)
def post_shares(
    device: DeviceDep,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    round_id: RoundId,
) -> Response:
    return _post("shares", device, session, runtime, background, round_id)


@router.post("/{round_id}/masked", summary="Post the masked quantized update", **_POST_DOC)
def post_masked(
    device: DeviceDep,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    round_id: RoundId,
) -> Response:
    return _post("masked", device, session, runtime, background, round_id)


@router.post("/{round_id}/unmask", summary="Post the answer to the unmask request", **_POST_DOC)
def post_unmask(
    device: DeviceDep,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
    round_id: RoundId,
) -> Response:
    return _post("unmask", device, session, runtime, background, round_id)


def _get(what: str, device: DeviceIdentity, session: Session, round_id: int) -> Response:
    data = secure_messages.fetch(session, device.id, round_id, what)
    return Response(data, media_type="application/octet-stream")


@router.get("/{round_id}/adverts", summary="The advertised neighbours' adverts", **_GET_DOC)
def get_adverts(device: DeviceDep, session: SessionDep, round_id: RoundId) -> Response:
    return _get("adverts", device, session, round_id)


@router.get("/{round_id}/shares", summary="The share bundles addressed to this device", **_GET_DOC)
def get_shares(device: DeviceDep, session: SessionDep, round_id: RoundId) -> Response:
    return _get("shares", device, session, round_id)


@router.get("/{round_id}/unmask", summary="This device's unmask request", **_GET_DOC)
def get_unmask(device: DeviceDep, session: SessionDep, round_id: RoundId) -> Response:
    return _get("unmask", device, session, round_id)
