"""One error family, one renderer.

::

    ApiError (status, code, detail)
    ├── BadRequest            400
    ├── Unauthorized          401
    ├── Forbidden             403
    ├── NotFound              404
    ├── Conflict              409
    ├── Gone                  410
    ├── PayloadTooLarge       413
    ├── Unprocessable         422
    ├── TooEarly              425
    ├── RateLimited           429 (Retry-After)
    └── NotReady              503

A blob that the database names but the blob store lacks (a restore without the blob
directory, a lost volume) renders as 503 ``blob_missing`` with its digest, not as a 500.

Every rejection renders as ``{"error": code, "detail": text}``; FastAPI's validation errors and
Starlette's routing errors are rendered the same way.

An unexpected exception is answered 500 ``internal_error`` by :class:`UnhandledErrorMiddleware`
and goes no further, so the connection stays open for the client's next request (Starlette's
own last resort sends the same answer, then raises the exception again for the server, and
uvicorn then closes the kept-alive connection).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedge.coordinator.blobstore import BlobDamaged, BlobNotFound

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    status_code = 400
    default_code = "bad_request"

    def __init__(
        self, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.headers = headers


class BadRequest(ApiError):
    status_code, default_code = 400, "bad_request"


class Unauthorized(ApiError):
    status_code, default_code = 401, "unauthorized"


class Forbidden(ApiError):
    status_code, default_code = 403, "forbidden"


class NotFound(ApiError):
    status_code, default_code = 404, "not_found"


class Conflict(ApiError):
    status_code, default_code = 409, "conflict"


class Gone(ApiError):
    status_code, default_code = 410, "gone"


class PayloadTooLarge(ApiError):
    status_code, default_code = 413, "payload_too_large"


class Unprocessable(ApiError):
    status_code, default_code = 422, "validation_error"


class TooEarly(ApiError):
    status_code, default_code = 425, "phase_not_ready"


class RateLimited(ApiError):
    status_code, default_code = 429, "rate_limited"


class NotReady(ApiError):
    status_code, default_code = 503, "not_ready"


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing or invalid credentials",
    403: "Not allowed for this caller",
    404: "No such resource",
    409: "Conflicts with the resource's current state",
    410: "No longer available (e.g. a model version pruned by the retention policy)",
    413: "Body larger than the configured limit",
    422: "Request body or parameters are invalid",
    425: "Not available yet (e.g. a secure-aggregation phase that has not opened); ask again",
    429: "Too many requests; retry after the given time",
    503: "Not ready",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error body for each status."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}


def _render(status: int, code: str, detail: str, headers: dict[str, str] | None = None):
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _summarize_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


#: The answer to an unexpected exception (its traceback goes to the log only).
INTERNAL_DETAIL = "the coordinator hit an unexpected error"


class UnhandledErrorMiddleware:
    """Answers an exception that no handler took with 500 ``internal_error``, logs it, and
    returns normally: the server never sees it, so it keeps the connection open. Starlette's
    ``ServerErrorMiddleware`` (the ``Exception`` handler below) answers the same but raises
    the exception again afterwards, and uvicorn then closes the connection, so a device's next
    request on its kept-alive connection met a closed socket and paid a new TLS handshake.
    When the answer had already started, the exception goes on (the response is broken: the
    connection must close)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error", exc_info=exc)
            await _render(500, "internal_error", INTERNAL_DETAIL)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _render(exc.status_code, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _render(422, "validation_error", _summarize_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            422: "validation_error",
            429: "rate_limited",
        }
        code = codes.get(exc.status_code, "http_error")
        return _render(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(BlobNotFound)
    async def _blob_missing(_request: Request, exc: BlobNotFound) -> JSONResponse:
        digest = exc.args[0] if exc.args else "?"
        log.error("blob %s is named in the database but missing from the blob store", digest)
        return _render(
            503,
            "blob_missing",
            f"blob {digest} is missing from the blob store; restore the blob directory",
        )

    @app.exception_handler(BlobDamaged)
    async def _blob_damaged(_request: Request, exc: BlobDamaged) -> JSONResponse:
        log.error("%s", exc)
        return _render(
            503,
            "blob_damaged",
            f"blob {exc.digest} is damaged in the blob store; restore it from a backup",
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The last resort, for an exception from the middleware outside
        # UnhandledErrorMiddleware (Starlette raises it again after this answer).
        log.exception("unhandled error", exc_info=exc)
        return _render(500, "internal_error", INTERNAL_DETAIL)
