"""Enrollment tokens, device enrollment and revocation (service functions: flush, never commit).

A token's use is counted by one conditional ``UPDATE ... SET uses = uses + 1 WHERE uses <
max_uses AND not revoked AND not expired``: the database serializes concurrent enrollments on
the row, so a token with ``max_uses=1`` enrolls exactly one device however many race for it.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedge.coordinator.db import in_states, utcnow
from fedge.coordinator.errors import Conflict, Unauthorized
from fedge.coordinator.models import Assignment, Device, EnrollmentToken
from fedge.coordinator.secrets import TOKEN_PREFIX, display_prefix, hash_secret, new_secret
from fedge.coordinator.states import ASSIGNMENT_ACTIVE, AssignmentStatus, DeviceStatus


def create_token(
    session: Session, *, label: str, max_uses: int, expires_in_s: int
) -> tuple[EnrollmentToken, str]:
    """A new token row (flushed) and its secret, which is shown only once."""
    secret = new_secret(TOKEN_PREFIX)
    token = EnrollmentToken(
        token_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        label=label,
        max_uses=max_uses,
        uses=0,
        created_at=utcnow(),
        expires_at=utcnow() + timedelta(seconds=expires_in_s),
    )
    session.add(token)
    session.flush()
    return token, secret


def token_status(token: EnrollmentToken, *, now: datetime | None = None) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.uses >= token.max_uses:
        return "used_up"
    if token.expires_at <= (now or utcnow()):
        return "expired"
    return "active"


def _use_token(session: Session, secret: str) -> int:
    """Count one use of the token with this secret; its id, or 401 ``invalid_token``."""
    now = utcnow()
    token_id = session.scalar(
        update(EnrollmentToken)
        .where(
            EnrollmentToken.token_hash == hash_secret(secret),
            EnrollmentToken.revoked_at.is_(None),
            EnrollmentToken.expires_at > now,
            EnrollmentToken.uses < EnrollmentToken.max_uses,
        )
        .values(uses=EnrollmentToken.uses + 1)
        .returning(EnrollmentToken.id)
        .execution_options(synchronize_session=False)
    )
    if token_id is None:
        raise Unauthorized(
            "the enrollment token is unknown, expired, revoked or used up", code="invalid_token"
        )
    return int(token_id)


def _repeated_enrollment(session: Session, *, token: str, public_key: str) -> Device | None:
    """The active device this token already enrolled with this key, if any.

    A device whose enrollment answer was lost (a dropped connection) retries with the same
    token and key; it gets its device id again, without using the token a second time."""
    return session.scalar(
        select(Device)
        .join(EnrollmentToken, EnrollmentToken.id == Device.enrollment_token_id)
        .where(
            Device.public_key == public_key,
            Device.status == DeviceStatus.ACTIVE,
            EnrollmentToken.token_hash == hash_secret(token),
        )
    )


def enroll_device(
    session: Session,
    *,
    token: str,
    public_key: str,
    name: str,
    capabilities: dict[str, Any],
    tags: list[str] | None = None,
) -> tuple[Device, bool]:
    """Register a device's public key with an enrollment token (flushed).

    Returns the device and whether it is new; a repeat of an earlier enrollment (same token,
    same key) returns the device it created."""
    existing = _repeated_enrollment(session, token=token, public_key=public_key)
    if existing is not None:
        return existing, False
    token_id = _use_token(session, token)
    if session.scalar(select(Device.id).where(Device.public_key == public_key)) is not None:
        raise Conflict("this public key is already enrolled", code="key_already_enrolled")
    device = Device(
        id=str(uuid.uuid4()),
        name=name,
        public_key=public_key,
        status=DeviceStatus.ACTIVE,
        capabilities=capabilities,
        tags=sorted(set(tags or [])),
        enrollment_token_id=token_id,
        enrolled_at=utcnow(),
    )
    session.add(device)
    try:
        session.flush()
    except IntegrityError:  # the same key enrolled concurrently
        raise Conflict("this public key is already enrolled", code="key_already_enrolled") from None
    return device, True


def cancel_active_assignments(session: Session, *, device_id: str) -> int:
    """Cancel the device's assigned/downloaded assignments; how many were cancelled."""
    result = session.execute(
        update(Assignment)
        .where(Assignment.device_id == device_id, in_states(Assignment.status, ASSIGNMENT_ACTIVE))
        .values(status=AssignmentStatus.CANCELLED, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def revoke_device(session: Session, device: Device) -> None:
    """Revoke at once: its next request is refused, its active assignments are cancelled.

    Revoking a revoked device changes nothing (the first revocation time is kept)."""
    if device.status == DeviceStatus.REVOKED:
        return
    device.status = DeviceStatus.REVOKED
    device.revoked_at = utcnow()
    cancel_active_assignments(session, device_id=device.id)
    session.flush()
