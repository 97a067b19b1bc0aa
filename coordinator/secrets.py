"""Secrets shown once (API keys, enrollment tokens) and stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets as _secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.db import utcnow
from fedge.coordinator.models import ROLES, ApiKey

API_KEY_PREFIX = "fk_"
TOKEN_PREFIX = "fe_"  # noqa: S105  # nosec B105  # a prefix, not a secret


def new_secret(prefix: str) -> str:
    return prefix + _secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # Secrets carry 256 bits of randomness, so a plain SHA-256 is a sound verifier.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:10]


def create_api_key(session: Session, *, name: str, role: str) -> tuple[ApiKey, str]:
    """A new API key row (flushed, not committed) and its secret, which is shown only once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    secret = new_secret(API_KEY_PREFIX)
    key = ApiKey(key_hash=hash_secret(secret), prefix=display_prefix(secret), name=name, role=role)
    session.add(key)
    session.flush()
    return key, secret


def find_api_key(session: Session, secret: str, *, now: datetime | None = None) -> ApiKey | None:
    """The active key with this secret, or None."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret)))
    if key is None or key.revoked_at is not None:
        return None
    key.last_used_at = now or utcnow()
    return key
