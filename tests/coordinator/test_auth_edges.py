"""Device verification at its edges, on a real runtime and database without a server: the
exact SQL of the nonce and touch statements on both dialects, boundaries (a nonce expiring at
this very instant, a cached row exactly its TTL old, a full cache, the prune interval),
datetimes in other time zones, the body reader's limits, and the two FastAPI dependencies in
a small app of their own (what they hand the handler; the error a handler that forgets its
claim causes)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql, sqlite
from starlette.requests import Request

from fedge.coordinator import auth
from fedge.coordinator.db import session_scope, utcnow, write_connection
from fedge.coordinator.errors import PayloadTooLarge, Unauthorized
from fedge.coordinator.models import Device, UsedNonce
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.coordinator.states import DeviceStatus
from fedge.shared import signing
from tests.coordinator import test_auth_paths
from tests.coordinator.test_auth_paths import KEY, Clock, _enroll, _nonces, _row

#: Five hours behind UTC: its wall-clock text sorts before the same instant's UTC text.
WEST = timezone(timedelta(hours=-5))


tight_runtime = test_auth_paths.tight_runtime  # the fixture, found here by pytest


@pytest.fixture
def rt(tight_runtime: Runtime) -> Runtime:
    """test_auth_paths' runtime on each backend (skew 60 s, 3 requests a minute)."""
    return tight_runtime


@pytest.fixture(autouse=True)
def fresh_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nonce and touch statements are built once per process; build them here."""
    monkeypatch.setattr(auth, "_NONCE_STATEMENTS", {})
    monkeypatch.setattr(auth, "_TOUCH_STATEMENTS", {})


# --------------------------------------------------------------------------- the statements

NONCE_SQL = {
    "postgresql": (
        "INSERT INTO used_nonces (device_id, nonce, expires_at) VALUES (%(p_device)s::VARCHAR, "
        "%(p_nonce)s::VARCHAR, %(p_expires)s::TIMESTAMP WITH TIME ZONE) ON CONFLICT "
        "(device_id, nonce) DO UPDATE SET expires_at = excluded.expires_at WHERE "
        "used_nonces.expires_at < %(p_now)s::TIMESTAMP WITH TIME ZONE RETURNING used_nonces.nonce"
    ),
    "sqlite": (
        "INSERT INTO used_nonces (device_id, nonce, expires_at) VALUES (?, ?, ?) ON CONFLICT "
        "(device_id, nonce) DO UPDATE SET expires_at = excluded.expires_at WHERE "
        "used_nonces.expires_at < ? RETURNING nonce"
    ),
}
DIALECTS = {"postgresql": postgresql.dialect(), "sqlite": sqlite.dialect()}


# The ids do not name the backend: both dialects are compiled here on every leg (the
# PostgreSQL leg of the mutation run deselects tests with "-k 'not sqlite'").
@pytest.mark.parametrize("name", ["postgresql", "sqlite"], ids=["pg-text", "lite-text"])
def test_the_nonce_statement_of_each_dialect(name: str) -> None:
    """One statement (the conflict target, the takeover of an expired row only, the typed
    parameters), built once per dialect, compiled here without a server."""
    stmt = auth._nonce_statement(name)
    assert str(stmt.compile(dialect=DIALECTS[name])) == NONCE_SQL[name]
    assert auth._nonce_statement(name) is stmt
    assert {name: stmt} == auth._NONCE_STATEMENTS


def test_an_unknown_dialect_is_refused() -> None:
    with pytest.raises(RuntimeError) as err:
        auth._nonce_statement("mysql")
    assert str(err.value) == "unsupported database dialect 'mysql'"


@pytest.mark.parametrize(
    ("count", "seen", "sql"),
    [
        (
            None,
            True,
            "UPDATE devices SET last_seen_at=? WHERE devices.id = ? AND devices.status = ?",
        ),
        (
            "num_assigned",
            True,
            "UPDATE devices SET last_seen_at=?, num_assigned=(devices.num_assigned + ?) "
            "WHERE devices.id = ? AND devices.status = ?",
        ),
        (
            "num_completed",
            False,
            "UPDATE devices SET num_completed=(devices.num_completed + ?) "
            "WHERE devices.id = ? AND devices.status = ?",
        ),
    ],
)
def test_the_touch_statements(count: str | None, seen: bool, sql: str) -> None:
    stmt = auth._touch_statement(count, seen)
    assert str(stmt.compile(dialect=DIALECTS["sqlite"])) == sql
    assert auth._touch_statement(count, seen) is stmt
    assert {(count, seen): stmt} == auth._TOUCH_STATEMENTS


# ------------------------------------------------------------------------ nonces and touches


def _claim(authenticator: auth.DeviceAuthenticator, nonce: str) -> auth.RequestClaim:
    return auth.RequestClaim("dev-a", nonce, timedelta(seconds=120), authenticator)


def _add_nonce(runtime: Runtime, nonce: str, expires_at: datetime) -> None:
    with write_connection(runtime.engine) as conn:
        conn.execute(
            insert(UsedNonce).values(device_id="dev-a", nonce=nonce, expires_at=expires_at)
        )


def _expiry(runtime: Runtime, nonce: str) -> datetime:
    with runtime.engine.connect() as conn:
        return conn.execute(
            select(UsedNonce.expires_at).where(UsedNonce.nonce == nonce)
        ).scalar_one()


def test_a_nonce_expiring_at_this_instant_is_still_in_use(rt: Runtime) -> None:
    """Neither taken over by a replay nor pruned: a nonce is free only once its expiry has
    passed."""
    _enroll(rt, "dev-a")
    now = utcnow()
    _add_nonce(rt, "n" * 22, now)
    authenticator = auth.DeviceAuthenticator(rt, clock=Clock())  # the first record prunes
    with pytest.raises(Unauthorized) as err, write_connection(rt.engine) as conn:
        auth.record_nonce(conn, _claim(authenticator, "n" * 22), now=now)
    assert err.value.code == "replayed_nonce"
    assert err.value.detail == "this nonce was already used; sign every request with a fresh nonce"
    with write_connection(rt.engine) as conn:
        auth.record_nonce(conn, _claim(authenticator, "m" * 22), now=now)
    assert _nonces(rt) == 2  # the prune kept the row that expires now
    assert _expiry(rt, "n" * 22) == now


def test_nonce_times_in_another_time_zone_mean_the_same_instant(rt: Runtime) -> None:
    _enroll(rt, "dev-a")
    now = utcnow()
    authenticator = auth.DeviceAuthenticator(rt)
    with write_connection(rt.engine) as conn:
        auth.record_nonce(conn, _claim(authenticator, "w" * 22), now=now.astimezone(WEST))
    assert _expiry(rt, "w" * 22) == now + timedelta(seconds=120)
    # A row that expired a second ago is taken over, whatever the zone of "now".
    _add_nonce(rt, "e" * 22, now - timedelta(seconds=1))
    with write_connection(rt.engine) as conn:
        auth.record_nonce(conn, _claim(authenticator, "e" * 22), now=now.astimezone(WEST))
    assert _expiry(rt, "e" * 22) == now + timedelta(seconds=120)


def test_insert_nonce_takes_a_session_too(rt: Runtime) -> None:
    now = utcnow()
    with session_scope(rt.sessions) as session:
        assert auth._insert_nonce(session, "dev-s", "s" * 22, now=now, ttl=timedelta(seconds=9))
        assert not auth._insert_nonce(session, "dev-s", "s" * 22, now=now, ttl=timedelta(seconds=9))


def test_touch_device_in_another_time_zone(rt: Runtime) -> None:
    _enroll(rt, "dev-a")
    now = utcnow()
    with write_connection(rt.engine) as conn:
        auth.touch_device(conn, "dev-a", now=now.astimezone(WEST))
    with rt.engine.connect() as conn:
        seen = conn.execute(select(Device.last_seen_at).where(Device.id == "dev-a")).scalar_one()
    assert seen == now


def test_the_device_row_lookup(rt: Runtime) -> None:
    _enroll(rt, "dev-a")
    with write_connection(rt.engine) as conn:
        conn.execute(Device.__table__.update().values(name="kitchen sensor"))
    assert auth._device_row(rt, "dev-a") == auth.DeviceRow(
        id="dev-a",
        name="kitchen sensor",
        status=DeviceStatus.ACTIVE,
        public_key=signing.public_key_to_b64(KEY.public_key()),
    )
    assert auth._device_row(rt, "nobody") is None


# ------------------------------------------------------------- the authenticator's clock


def test_cached_rows_expire_at_exactly_their_ttl(rt: Runtime) -> None:
    clock = Clock()
    authenticator = auth.DeviceAuthenticator(rt, clock=clock)
    row = _row()
    authenticator.remember(row)
    clock.now += auth.DEVICE_ROW_TTL_S - 0.001
    assert authenticator.known_row("dev-a") == row
    clock.now += 0.001
    assert authenticator.known_row("dev-a") is None
    assert authenticator.known_row("dev-a", bodyless=True) == row
    clock.now = 1000.0 + auth.BODYLESS_ROW_TTL_S
    assert authenticator.known_row("dev-a", bodyless=True) is None
    assert "dev-a" not in authenticator._rows


def test_the_rate_limiter_runs_on_the_authenticators_clock(rt: Runtime) -> None:
    clock = Clock()
    authenticator = auth.DeviceAuthenticator(rt, clock=clock)  # 3 a minute: one per 20 s
    assert [authenticator.limiter.acquire("dev-a") for _ in range(3)] == [0.0] * 3
    assert authenticator.limiter.acquire("dev-a") == pytest.approx(20.0)
    clock.now += 20.0
    assert authenticator.limiter.acquire("dev-a") == 0.0


def test_nonce_pruning_comes_once_per_interval(rt: Runtime) -> None:
    clock = Clock()
    authenticator = auth.DeviceAuthenticator(rt, clock=clock)
    assert authenticator._prune_due()
    assert not authenticator._prune_due()
    clock.now += auth.NONCE_PRUNE_INTERVAL_S - 0.001
    assert not authenticator._prune_due()
    clock.now += 0.001
    assert authenticator._prune_due()


def test_the_caches_never_exceed_their_size(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "KEY_CACHE_SIZE", 2)
    authenticator = auth.DeviceAuthenticator(rt)
    for name in ("d1", "d2", "d3"):
        authenticator.remember(_row(name))
        assert len(authenticator._rows) <= 2
    assert list(authenticator._rows) == ["d3"]  # full: cleared, then the new row kept
    texts = [signing.public_key_to_b64(KEY.public_key())]
    texts += [signing.public_key_to_b64(_other_key()) for _ in range(2)]
    for text in texts:
        authenticator._public_key(text)
        assert len(authenticator._keys) <= 2
    assert list(authenticator._keys) == [texts[2]]


def _other_key() -> object:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key()


def test_the_long_poll_retry_is_one_recheck_period_rounded_up(settings: Settings) -> None:
    for recheck, retry in ((0.2, 1), (1.0, 1), (2.5, 3)):
        runtime = SimpleNamespace(
            slots=None, settings=settings.model_copy(update={"long_poll_recheck_s": recheck})
        )
        slots = auth.get_device_slots(runtime)  # type: ignore[arg-type]
        assert slots.poll_retry_after_s == retry
        assert auth.get_device_slots(runtime) is slots  # type: ignore[arg-type]


# -------------------------------------------------------------------------- the body reader


def _request(chunks: list[bytes], *, declared: int | None) -> Request:
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/x",
        "query_string": b"",
        "headers": headers,
    }
    messages = [
        {"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    return Request(scope, receive)


def _read(request: Request, limit: int) -> bytes:
    return asyncio.run(auth.read_body(request, limit=limit))


@pytest.mark.parametrize("declared", [10, None])
def test_a_body_of_exactly_the_limit_is_read_and_cached(declared: int | None) -> None:
    request = _request([b"12345", b"67890"], declared=declared)
    assert _read(request, 10) == b"1234567890"
    assert asyncio.run(request.body()) == b"1234567890"  # Starlette's reader sees it too
    assert _read(request, 10) == b"1234567890"  # from the cache (the stream is spent)


def test_a_cached_body_is_checked_against_the_limit_of_each_reader() -> None:
    """A route reads the body under its own limit; a later reader with a smaller one is
    refused on the cached body's size (no Content-Length here: a streamed body)."""
    request = _request([b"12345", b"67890"], declared=None)
    assert _read(request, 20) == b"1234567890"
    with pytest.raises(PayloadTooLarge) as err:
        _read(request, 9)
    assert err.value.detail == "body of 10 bytes exceeds the limit of 9"


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    request = _request([b"x" * 11], declared=11)
    with pytest.raises(PayloadTooLarge) as err:
        _read(request, 10)
    assert err.value.detail == "body of 11 bytes exceeds the limit of 10"


def test_a_streamed_body_is_refused_once_its_chunks_exceed_the_limit() -> None:
    exact = _request([b"123456", b"7890"], declared=None)
    assert _read(exact, 10) == b"1234567890"
    over = _request([b"123456", b"78901"], declared=None)
    with pytest.raises(PayloadTooLarge) as err:
        _read(over, 10)
    assert err.value.detail == "body exceeds the limit of 10 bytes"


# ------------------------------------------------------------------- the FastAPI dependencies


def _app(rt: Runtime) -> FastAPI:
    app = FastAPI()
    app.state.runtime = rt

    @app.post("/probe")
    def probe(
        device: Annotated[auth.DeviceIdentity, Depends(auth.authenticate_device)],
    ) -> dict[str, object]:
        return {"id": device.id, "name": device.name, "body": device.body.decode()}

    @app.post("/forgetful")
    def forgetful(
        device: Annotated[auth.DeviceIdentity, Depends(auth.authenticate_device_deferred)],
    ) -> dict[str, object]:
        return {"claim": device.claim is not None}  # never records it: a handler bug

    return app


def _post(app: FastAPI, path: str, body: bytes) -> dict[str, object]:
    headers = signing.sign_request(
        KEY, device_id="dev-a", method="POST", path=path, query="", body=body
    )

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fedge") as client:
            return await client.post(path, content=body, headers=headers)

    response = asyncio.run(send())
    assert response.status_code == 200, response.text
    return response.json()


def test_the_dependencies_in_an_app_of_their_own(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    _enroll(rt, "dev-a")
    with write_connection(rt.engine) as conn:
        conn.execute(Device.__table__.update().values(name="kitchen sensor"))
    caplog.set_level(logging.ERROR, logger="fedge.coordinator.auth")
    app = _app(rt)
    # DeviceDep: the identity (its name and the signed body), the nonce already recorded.
    answer = _post(app, "/probe", b"hello")
    assert answer == {"id": "dev-a", "name": "kitchen sensor", "body": "hello"}
    assert _nonces(rt) == 1
    assert caplog.records == []
    # DeviceClaimDep with a handler that never records the claim: answered, and logged.
    assert _post(app, "/forgetful", b"") == {"claim": True}
    assert _nonces(rt) == 1
    [record] = caplog.records
    assert record.getMessage() == "device request answered without recording its nonce"
    assert (record.device, record.path) == ("dev-a", "/forgetful")  # type: ignore[attr-defined]
