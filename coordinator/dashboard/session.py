"""Dashboard logins: a session cookie signed by the coordinator.

An administrator posts an API key (admin or viewer role) to the login form once; the answer
sets the cookie ``fedge_session`` = ``<key id>.<expiry>.<mac>`` and the key itself is never
stored in the browser, in a URL or in a log. ``mac`` is an HMAC-SHA256 of ``<key id>.<expiry>``
under a secret derived from that API key's stored hash, so:

- every coordinator process (and replica) sharing the database checks a session without any
  other shared secret;
- revoking the key ends its sessions at once (the key row is read on every page);
- the cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page
  sends it), ``Secure`` over HTTPS, and limited to ``/dashboard``.

The dashboard only reads: its one state-changing form posts (log in, log out) also require an
``Origin`` header naming the coordinator itself when the browser sends one, so another site
cannot post them (login CSRF).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedge.coordinator.models import ApiKey
from fedge.coordinator.secrets import hash_secret

COOKIE = "fedge_session"
COOKIE_PATH = "/dashboard"
_CONTEXT = b"fedge dashboard session v1"


@dataclass(frozen=True)
class Login:
    key_id: int
    name: str
    role: str


def _mac(key_hash: str, message: str) -> str:
    secret = hmac.new(key_hash.encode(), _CONTEXT, hashlib.sha256).digest()
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def check_key(session: Session, secret: str) -> ApiKey | None:
    """The active API key ``secret`` names, or None."""
    if not secret or len(secret) > 200:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def issue(key: ApiKey, *, lifetime_s: int, now: float | None = None) -> str:
    """A session value for ``key`` valid for ``lifetime_s`` seconds."""
    expires = int((time.time() if now is None else now) + lifetime_s)
    message = f"{key.id}.{expires}"
    return f"{message}.{_mac(key.key_hash, message)}"


def verify(session: Session, value: str | None, *, now: float | None = None) -> Login | None:
    """The login a cookie value proves, or None (malformed, expired, forged, key revoked)."""
    if not value or len(value) > 200:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    key_id, expires = int(parts[0]), int(parts[1])
    if expires < (time.time() if now is None else now) or key_id > 2**31 - 1:
        return None
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(parts[2], _mac(key.key_hash, f"{parts[0]}.{parts[1]}")):
        return None
    return Login(key_id=key.id, name=key.name, role=key.role)
