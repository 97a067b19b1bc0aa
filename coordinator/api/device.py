"""The device API: enrollment (unsigned), the device's own record, model download.

Every route but enrollment depends on ``DeviceDep`` (a verified signed request). The work
long-poll, update upload and metrics live in :mod:`coordinator.api.device_work`.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from coordinator.api.deps import DeviceDep, SessionDep
from coordinator.api.devices import to_public
from coordinator.enrollment import enroll_device
from coordinator.errors import NotFound, error_responses
from coordinator.models import Device
from coordinator.schemas.devices import DevicePublic, EnrollRequest, EnrollResponse

router = APIRouter(prefix="/device", tags=["device"])

#: Errors every signed route can answer (see coordinator.auth).
SIGNED_ERRORS = (401, 403, 413, 429)


@router.post(
    "/enroll",
    status_code=201,
    response_model=EnrollResponse,
    summary="Enroll a device with an enrollment token and its Ed25519 public key",
    responses=error_responses(401, 409, 422),
)
def enroll(body: EnrollRequest, session: SessionDep) -> EnrollResponse:
    device = enroll_device(
        session,
        token=body.token,
        public_key=body.public_key,
        name=body.name,
        capabilities=body.capabilities,
    )
    return EnrollResponse(device_id=device.id, name=device.name, enrolled_at=device.enrolled_at)


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:  # deleted between verification and now
        raise NotFound(f"no device {device_id}")
    return device


@router.get(
    "/me",
    response_model=DevicePublic,
    summary="The calling device's own record",
    responses=error_responses(*SIGNED_ERRORS, 404),
)
def me(device: DeviceDep, session: SessionDep) -> DevicePublic:
    return to_public(_device(session, device.id))
