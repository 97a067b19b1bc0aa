"""The dashboard (``/dashboard``): a server-rendered, read-only view of tasks, rounds,
devices and recent events for administrators, behind a login with an API key
(:mod:`fedge.coordinator.dashboard.session`). Charts are drawn by a small script served by
the coordinator itself (``/static/dashboard/chart.js``); nothing loads from elsewhere."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Cookie, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from fedge.coordinator.dashboard import data, session, views
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.errors import BadRequest, Forbidden
from fedge.coordinator.runtime import Runtime

LOGIN = "/dashboard/login"
HOME = "/dashboard"


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _same_origin(request: Request) -> None:
    """Refuse a form post that another site's page made (403 ``cross_origin``)."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    site = request.headers.get("sec-fetch-site")
    if (origin is not None and origin != own) or site not in (None, "same-origin", "none"):
        raise Forbidden("form posted from another site", code="cross_origin")


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=views.SECURITY_HEADERS)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard's routes to ``app`` (not part of the OpenAPI document)."""

    @app.get(HOME, include_in_schema=False)
    def dashboard(
        request: Request, fedge_session: Annotated[str | None, Cookie()] = None
    ) -> Response:
        runtime = _runtime(request)
        with session_scope(runtime.sessions, read_only=True) as db:
            login = session.verify(db, fedge_session)
            if login is None:
                return RedirectResponse(LOGIN, status_code=303)
            overview = data.overview(
                db, now=utcnow(), seen_window_s=runtime.settings.device_seen_window_s
            )
        return _html(views.dashboard_page(overview, who=login.name, role=login.role))

    @app.get(LOGIN, include_in_schema=False)
    def login_form() -> Response:
        return _html(views.login_page())

    @app.post(LOGIN, include_in_schema=False)
    async def login(request: Request) -> Response:
        _same_origin(request)
        try:
            form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:
            raise BadRequest("a login form has one field, api_key") from None
        secret = (form.get("api_key") or [""])[0].strip()
        runtime = _runtime(request)

        def check() -> str | None:
            with session_scope(runtime.sessions, read_only=True) as db:
                key = session.check_key(db, secret)
                if key is None:
                    return None
                return session.issue(key, lifetime_s=runtime.settings.dashboard_session_s)

        value = await run_in_threadpool(check)
        if value is None:
            detail = "unknown or revoked API key"
            if _wants_html(request):
                return _html(views.login_page(detail), status=401)
            return JSONResponse({"error": "unauthorized", "detail": detail}, status_code=401)
        answer = RedirectResponse(HOME, status_code=303)
        answer.set_cookie(
            session.COOKIE,
            value,
            max_age=runtime.settings.dashboard_session_s,
            path=session.COOKIE_PATH,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return answer

    @app.post("/dashboard/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        _same_origin(request)
        answer = RedirectResponse(LOGIN, status_code=303)
        answer.delete_cookie(
            session.COOKIE,
            path=session.COOKIE_PATH,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return answer
