"""Errors the agent's HTTP clients raise.

Every error carries ``code`` (the coordinator's stable error code, or a local one), ``status``
(the HTTP status, ``None`` when no answer arrived) and ``detail`` (plain words)::

    AgentError
    ├── Unreachable            no answer after all retries (connection, timeout)
    │   └── TlsUntrusted       the server's certificate fails verification against the CA
    ├── CaFileError            the CA file to pin is missing, unreadable or not PEM
    └── ApiError               the coordinator answered with an error status
        ├── AuthError          401: bad signature, clock skew, replay, unknown device/key/token
        ├── Forbidden          403
        │   └── DeviceRevoked  403 device_revoked
        ├── NotFound           404
        ├── Conflict           409
        │   ├── StaleUpdate    409 stale_update: the update is too old; drop it
        │   ├── AlreadyUploaded 409 already_uploaded
        │   └── TaskNotRunning 409 task_not_running
        ├── RateLimited        429 (``retry_after`` in seconds, when given)
        └── ServerError        5xx

The coordinator answers every rejection with ``{"error": code, "detail": text}``;
:func:`error_from_response` maps such an answer to the most specific class.
"""

from __future__ import annotations

import json

import httpx


class AgentError(Exception):
    """Base of every error raised by the fedge HTTP clients."""

    def __init__(self, code: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {detail}" if status is None else f"{status} {code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = status


class Unreachable(AgentError):
    """The coordinator could not be reached (after the configured retries)."""


class TlsUntrusted(Unreachable):
    """The coordinator answered, but its certificate does not verify against the pinned CA
    (wrong ``ca.crt``, a certificate for another host name, or an expired one). Not retried."""


class CaFileError(AgentError):
    """The CA file given to pin cannot be used; ``detail`` names it and says what to do."""


class ApiError(AgentError):
    """The coordinator answered with an error status."""


class AuthError(ApiError):
    pass


class Forbidden(ApiError):
    pass


class DeviceRevoked(Forbidden):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class StaleUpdate(Conflict):
    pass


class AlreadyUploaded(Conflict):
    pass


class TaskNotRunning(Conflict):
    pass


class RateLimited(ApiError):
    def __init__(
        self, code: str, detail: str, *, status: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(code, detail, status=status)
        self.retry_after = retry_after


class ServerError(ApiError):
    pass


_BY_CODE: dict[str, type[ApiError]] = {
    "device_revoked": DeviceRevoked,
    "stale_update": StaleUpdate,
    "already_uploaded": AlreadyUploaded,
    "task_not_running": TaskNotRunning,
}
_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (HTTP dates are not used here)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


def error_from_response(response: httpx.Response) -> ApiError:
    """The error for a non-success answer, read from its ``{"error", "detail"}`` body."""
    status = response.status_code
    code, detail = f"http_{status}", response.reason_phrase or "error"
    try:
        body = json.loads(response.content) if response.content else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        code = str(body.get("error") or code)
        raw_detail = body.get("detail", detail)
        detail = raw_detail if isinstance(raw_detail, str) else json.dumps(raw_detail)
    elif response.content:
        detail = response.content[:200].decode("utf-8", "replace")
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RateLimited(code, detail, status=status, retry_after=retry_after)
    if status >= 500:
        return ServerError(code, detail, status=status)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, ApiError)
    return cls(code, detail, status=status)
