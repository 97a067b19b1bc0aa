"""Enrollment tokens (admin API): create (secret shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select

from fedge.coordinator.api.deps import MAX_ID, AdminDep, Pagination, SessionDep, ViewerDep, page_of
from fedge.coordinator.db import utcnow
from fedge.coordinator.enrollment import create_token, token_status
from fedge.coordinator.errors import NotFound, error_responses
from fedge.coordinator.models import EnrollmentToken
from fedge.coordinator.schemas.tokens import TokenCreate, TokenCreated, TokenPublic, TokensPublic

router = APIRouter(prefix="/enrollment-tokens", tags=["enrollment tokens"])
TokenId = Annotated[int, Path(ge=1, le=MAX_ID)]


def to_public(token: EnrollmentToken) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        prefix=token.prefix,
        label=token.label,
        max_uses=token.max_uses,
        uses=token.uses,
        status=token_status(token),  # type: ignore[arg-type]
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=TokenCreated,
    summary="Create an enrollment token (the secret is shown only here)",
    responses=error_responses(400, 401, 403, 422),
)
def create(body: TokenCreate, _caller: AdminDep, session: SessionDep) -> TokenCreated:
    token, secret = create_token(
        session, label=body.label, max_uses=body.max_uses, expires_in_s=body.expires_in_s
    )
    return TokenCreated(**to_public(token).model_dump(), token=secret)


@router.get(
    "",
    response_model=TokensPublic,
    summary="List enrollment tokens (newest first)",
    responses=error_responses(401, 422),
)
def list_tokens(_caller: ViewerDep, session: SessionDep, page: Pagination) -> TokensPublic:
    stmt = select(EnrollmentToken).order_by(EnrollmentToken.id.desc())
    return page_of(TokensPublic, session, stmt, page, to_public)


@router.post(
    "/{token_id}/revoke",
    response_model=TokenPublic,
    summary="Revoke an enrollment token (devices it enrolled stay enrolled)",
    responses=error_responses(401, 403, 404, 422),
)
def revoke(token_id: TokenId, _caller: AdminDep, session: SessionDep) -> TokenPublic:
    token = session.get(EnrollmentToken, token_id)
    if token is None:
        raise NotFound(f"no enrollment token {token_id}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.flush()
    return to_public(token)
