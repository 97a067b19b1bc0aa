"""Request dependencies shared by every router, as ``Annotated`` aliases.

- ``RuntimeDep``, ``SettingsDep``, ``BlobsDep``: what the running coordinator holds.
- ``SessionDep``: one database session per request; it commits when the handler returns and
  rolls back when it raises, both *before* the response is sent, so a client never sees a
  success for a change that was not committed. Service functions flush, never commit.
- ``AdminDep`` / ``ViewerDep``: the caller's API key (``Authorization: Bearer``); admin-only
  routes answer 403 ``forbidden`` to viewer keys.
- ``DeviceDep``: a verified signed device request (:mod:`fedge.coordinator.auth`). It holds no
  session open, so long-polls can wait without a database connection. ``DeviceClaimDep``
  (the upload and the work poll): the same checks, the nonce recorded by the handler's own
  transaction.
- ``Pagination``: ``limit``/``offset`` query parameters of list routes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from fedge.coordinator.auth import (
    DeviceIdentity,
    authenticate_device,
    authenticate_device_deferred,
)
from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.errors import Forbidden, Unauthorized, Unprocessable
from fedge.coordinator.models import ApiKey
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.secrets import hash_secret
from fedge.coordinator.settings import Settings

T = TypeVar("T")
P = TypeVar("P", bound=BaseModel)

#: Largest value accepted for integer identifiers in paths (fits a 32-bit INTEGER column).
MAX_ID = 2**31 - 1
#: How precisely an API key's ``last_used_at`` is kept.
LAST_USED_RESOLUTION = timedelta(minutes=1)
#: Largest list offset (keeps SQL parameters within every backend's integer range).
MAX_OFFSET = 2**31 - 1


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_blobs(runtime: RuntimeDep) -> BlobStore:
    return runtime.blobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    """One session per request: commit on success, roll back on error."""
    with session_scope(runtime.sessions) as session:
        yield session


# scope="function": the commit happens before the response leaves, not after.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer fk_...` (role admin or viewer).",
)


@dataclass(frozen=True)
class Caller:
    """The administrator (API key) making a request."""

    key_id: int
    name: str
    role: str


def get_caller(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    if credentials is None or not credentials.credentials:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_secret(credentials.credentials))
    )
    if key is None or key.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    now = utcnow()
    # Kept to the minute, so that reads do not turn into writes.
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        key.last_used_at = now
    return Caller(key_id=key.id, name=key.name, role=key.role)


def require_viewer(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    return caller


def require_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if caller.role != "admin":
        raise Forbidden(f"API key role '{caller.role}' may only read; this route needs 'admin'")
    return caller


ViewerDep = Annotated[Caller, Depends(require_viewer)]
AdminDep = Annotated[Caller, Depends(require_admin)]

DeviceDep = Annotated[DeviceIdentity, Depends(authenticate_device)]
#: Verified like ``DeviceDep``, but the nonce and ``last_seen_at`` are left to the handler's own
#: transaction (:attr:`DeviceIdentity.claim`, :func:`fedge.coordinator.auth.settle_claim`).
DeviceClaimDep = Annotated[DeviceIdentity, Depends(authenticate_device_deferred)]


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int


def get_page(
    limit: Annotated[int, Query(ge=1, le=500, description="Page size")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip")] = 0,
) -> Page:
    return Page(limit=limit, offset=offset)


Pagination = Annotated[Page, Depends(get_page)]


def page_of(
    schema: type[P],
    session: Session,
    stmt: Select[T],
    page: Page,
    convert: Callable[[T], Any],
) -> P:
    """One page of ``stmt``'s rows (which must be ordered), each converted to its public
    schema, with the total row count: the body of every list endpoint."""
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = session.scalars(stmt.limit(page.limit).offset(page.offset))
    return schema(
        items=[convert(row) for row in rows],
        total=int(total or 0),
        limit=page.limit,
        offset=page.offset,
    )


M = TypeVar("M", bound=BaseModel)


def parse_signed_json(model: type[M], body: bytes | None) -> M:
    """A signed request's JSON body (the exact bytes that were signed) as ``model``; 422
    naming the first bad field otherwise."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        message = errors[0]["msg"] if errors else "invalid body"
        raise Unprocessable(f"{where or 'body'}: {message}") from None
