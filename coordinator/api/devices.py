"""Devices (admin API): list, detail, tags, declines, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path, Query
from sqlalchemy import select

from fedge.coordinator.api.declines import declines_page
from fedge.coordinator.api.deps import (
    AdminDep,
    Pagination,
    RuntimeDep,
    SessionDep,
    ViewerDep,
    page_of,
)
from fedge.coordinator.api.signals import kick_scheduler, wake_devices
from fedge.coordinator.auth import get_authenticator
from fedge.coordinator.enrollment import revoke_device
from fedge.coordinator.errors import NotFound, error_responses
from fedge.coordinator.models import Device
from fedge.coordinator.schemas.devices import DevicePublic, DevicesPublic
from fedge.coordinator.schemas.targeting import DeclinesPublic, DeviceUpdate
from fedge.coordinator.states import DeviceStatus

router = APIRouter(prefix="/devices", tags=["devices"])
DeviceId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Device id")]


def to_public(device: Device) -> DevicePublic:
    return DevicePublic(
        device_id=device.id,
        name=device.name,
        status=device.status,
        public_key=device.public_key,
        capabilities=device.capabilities or {},
        capabilities_at=device.capabilities_at,
        tags=list(device.tags or []),
        enrolled_at=device.enrolled_at,
        last_seen_at=device.last_seen_at,
        revoked_at=device.revoked_at,
        enrollment_token_id=device.enrollment_token_id,
        num_assigned=device.num_assigned,
        num_completed=device.num_completed,
        num_dropped=device.num_dropped,
        num_declined=device.num_declined,
        num_norm_clipped=device.num_norm_clipped or 0,
        num_norm_refused=device.num_norm_refused or 0,
    )


def _get(session: SessionDep, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"no device {device_id}")
    return device


@router.get(
    "",
    response_model=DevicesPublic,
    summary="List devices (oldest enrollment first), optionally by status",
    responses=error_responses(401, 422),
)
def list_devices(
    _caller: ViewerDep,
    session: SessionDep,
    page: Pagination,
    status: Annotated[DeviceStatus | None, Query(description="Only this status")] = None,
) -> DevicesPublic:
    stmt = select(Device).order_by(Device.enrolled_at, Device.id)
    if status is not None:
        stmt = stmt.where(Device.status == status)
    return page_of(DevicesPublic, session, stmt, page, to_public)


@router.get(
    "/{device_id}",
    response_model=DevicePublic,
    summary="One device",
    responses=error_responses(401, 404, 422),
)
def get_device(device_id: DeviceId, _caller: ViewerDep, session: SessionDep) -> DevicePublic:
    return to_public(_get(session, device_id))


@router.patch(
    "/{device_id}",
    response_model=DevicePublic,
    summary="Change a device's tags (the whole list)",
    description="Tasks may require tags (docs/rounds.md, 'Eligibility'); the new tags count "
    "from the next selection on. Work the device already has is not affected.",
    responses=error_responses(400, 401, 403, 404, 422),
)
def update_device(
    device_id: DeviceId,
    body: DeviceUpdate,
    _caller: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> DevicePublic:
    device = _get(session, device_id)
    device.tags = sorted(set(body.tags))
    session.flush()
    background.add_task(kick_scheduler, runtime)
    return to_public(device)


@router.get(
    "/{device_id}/declines",
    response_model=DeclinesPublic,
    summary="The assignments a device declined, newest first, with its reasons",
    responses=error_responses(401, 404, 422),
)
def device_declines(
    device_id: DeviceId, _caller: ViewerDep, session: SessionDep, page: Pagination
) -> DeclinesPublic:
    _get(session, device_id)
    return declines_page(session, page, device_id=device_id)


@router.post(
    "/{device_id}/revoke",
    response_model=DevicePublic,
    summary="Revoke a device: refused at once, its active assignments cancelled",
    responses=error_responses(401, 403, 404, 422),
)
def revoke(
    device_id: DeviceId,
    _caller: AdminDep,
    session: SessionDep,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> DevicePublic:
    device = _get(session, device_id)
    revoke_device(session, device)
    get_authenticator(runtime).forget(device.id)
    background.add_task(wake_devices, runtime, [device.id])
    return to_public(device)
