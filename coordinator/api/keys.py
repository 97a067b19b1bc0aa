"""API keys (admin API): create (secret shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from fedge.coordinator.api.deps import MAX_ID, AdminDep, Pagination, SessionDep, ViewerDep, page_of
from fedge.coordinator.db import utcnow
from fedge.coordinator.errors import Conflict, NotFound, error_responses
from fedge.coordinator.models import ApiKey
from fedge.coordinator.schemas.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeysPublic
from fedge.coordinator.secrets import create_api_key

router = APIRouter(prefix="/api-keys", tags=["api keys"])
KeyId = Annotated[int, Path(ge=1, le=MAX_ID)]


def to_public(key: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic(
        id=key.id,
        prefix=key.prefix,
        name=key.name,
        role=key.role,  # type: ignore[arg-type]
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    summary="Create an API key (the secret is shown only here)",
    responses=error_responses(400, 401, 403, 422),
)
def create(body: ApiKeyCreate, _caller: AdminDep, session: SessionDep) -> ApiKeyCreated:
    key, secret = create_api_key(session, name=body.name, role=body.role)
    return ApiKeyCreated(**to_public(key).model_dump(), key=secret)


@router.get(
    "",
    response_model=ApiKeysPublic,
    summary="List API keys (newest first; secrets are never shown again)",
    responses=error_responses(401, 422),
)
def list_keys(_caller: ViewerDep, session: SessionDep, page: Pagination) -> ApiKeysPublic:
    return page_of(
        ApiKeysPublic, session, select(ApiKey).order_by(ApiKey.id.desc()), page, to_public
    )


@router.post(
    "/{key_id}/revoke",
    response_model=ApiKeyPublic,
    summary="Revoke an API key (refused for the last active admin key)",
    responses=error_responses(401, 403, 404, 409, 422),
)
def revoke(key_id: KeyId, _caller: AdminDep, session: SessionDep) -> ApiKeyPublic:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id}")
    if key.revoked_at is None:
        if key.role == "admin":
            # Locking the active admin keys serializes concurrent revocations (PostgreSQL),
            # so two of them cannot each leave the other as "the last one".
            active_admins = session.scalars(
                select(ApiKey.id)
                .where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
                .with_for_update()
            ).all()
            if len(active_admins) <= 1:
                raise Conflict("this is the last active admin key; create another admin key first")
        key.revoked_at = utcnow()
        session.flush()
    return to_public(key)
