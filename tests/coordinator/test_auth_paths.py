"""The device verification steps one by one, on a real runtime and database, without a server:
the configured skew window, the rate limiter before and after a 429, revoked and unknown
devices, nonces (replay, expiry, pruning) and the device row cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, insert, select

from fedge.coordinator import auth
from fedge.coordinator.db import utcnow, write_connection
from fedge.coordinator.errors import Forbidden, RateLimited, Unauthorized
from fedge.coordinator.models import Device, UsedNonce
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.coordinator.states import DeviceStatus
from fedge.coordinator.tls import TlsPaths
from fedge.shared import signing
from tests.support import databases
from tests.support.device import API, SignedDevice


class Clock:
    """A clock the test moves by hand (the limiter takes its clock as an argument)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_burst_refusal_and_refill() -> None:
    clock = Clock()
    limiter = auth.RateLimiter(6, clock=clock)  # 6 a minute: one token every 10 s
    assert [limiter.acquire("a") for _ in range(6)] == [0.0] * 6
    assert limiter.acquire("a") == pytest.approx(10.0)
    assert limiter.acquire("b") == 0.0  # buckets are per key
    # A refused request takes no token: 4 s later the wait is 6 s, whatever was refused.
    clock.now += 4.0
    assert limiter.acquire("a") == pytest.approx(6.0)
    assert limiter.acquire("a") == pytest.approx(6.0)
    clock.now += 6.0
    assert limiter.acquire("a") == 0.0  # granted once the announced wait is over
    assert limiter.acquire("a") == pytest.approx(10.0)
    # A long pause refills to the capacity, not beyond.
    clock.now += 3600.0
    assert [limiter.acquire("a") for _ in range(6)] == [0.0] * 6
    assert limiter.acquire("a") > 0.0


def test_rate_limiter_partial_tokens() -> None:
    clock = Clock()
    limiter = auth.RateLimiter(60, clock=clock)  # one token a second
    for _ in range(60):
        assert limiter.acquire("d") == 0.0
    clock.now += 0.25
    assert limiter.acquire("d") == pytest.approx(0.75)
    clock.now += 0.75
    assert limiter.acquire("d") == 0.0


TIGHT = {"signature_skew_s": 60, "device_rate_per_minute": 3}


@pytest.fixture
def tight_runtime(settings: Settings) -> Iterator[Runtime]:
    """A runtime on each backend (for the steps that write: nonces, ``last_seen_at``)."""
    rt = Runtime.open(settings.model_copy(update=TIGHT))
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture(scope="module")
def check_runtime(
    sqlite_template: databases.SqliteTemplate,
    tmp_path_factory: pytest.TempPathFactory,
    tls_paths: TlsPaths,
) -> Iterator[Runtime]:
    """One runtime for the steps that need no database (signature, status, skew, rate)."""
    where = tmp_path_factory.mktemp("auth-checks")
    settings = Settings(
        data_dir=where / "data",
        database_url=sqlite_template.fresh(where),
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        **TIGHT,
    )
    rt = Runtime.open(settings)
    try:
        yield rt
    finally:
        rt.close()


KEY = Ed25519PrivateKey.generate()


def _row(device_id: str = "dev-a", status: DeviceStatus = DeviceStatus.ACTIVE) -> auth.DeviceRow:
    return auth.DeviceRow(
        id=device_id,
        name=f"name of {device_id}",
        status=status,
        public_key=signing.public_key_to_b64(KEY.public_key()),
    )


def _signed(
    device_id: str = "dev-a", *, timestamp: int | None = None, body: bytes = b"payload"
) -> signing.SignedHeaders:
    headers = signing.sign_request(
        KEY,
        device_id=device_id,
        method="POST",
        path="/api/v1/x",
        query="q=1",
        body=body,
        timestamp=timestamp,
    )
    return signing.parse_signed_headers(headers)


def _check(
    authenticator: auth.DeviceAuthenticator,
    signed: signing.SignedHeaders,
    row: auth.DeviceRow,
    *,
    body: bytes = b"payload",
    query: str = "q=1",
) -> auth.DeviceIdentity:
    return authenticator.check(signed, row, method="POST", path="/api/v1/x", query=query, body=body)


def test_check_returns_the_identity_and_claim(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    signed = _signed()
    identity = _check(authenticator, signed, _row())
    assert (identity.id, identity.name, identity.body) == ("dev-a", "name of dev-a", b"payload")
    claim = identity.claim
    assert claim is not None
    assert (claim.device_id, claim.nonce, claim.recorded) == ("dev-a", signed.nonce, False)
    assert claim.ttl == timedelta(seconds=120)  # twice the configured 60 s window
    assert claim.authenticator is authenticator


@pytest.mark.parametrize(("offset", "ok"), [(-55, True), (55, True), (-65, False), (65, False)])
def test_the_configured_skew_window_is_used(check_runtime: Runtime, offset: int, ok: bool) -> None:
    """60 s configured: 65 s off is refused although the default window (300 s) allows it."""
    authenticator = auth.DeviceAuthenticator(check_runtime)
    signed = _signed(timestamp=int(time.time()) + offset)
    if ok:
        assert _check(authenticator, signed, _row()).id == "dev-a"
        return
    with pytest.raises(Unauthorized) as err:
        _check(authenticator, signed, _row())
    assert err.value.code == "clock_skew"
    assert "(allowed: 60 s)" in err.value.detail


def test_bad_signature_is_401_before_anything_else(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    # Even for a revoked device and an old timestamp, the signature is checked first.
    signed = _signed(timestamp=int(time.time()) - 3600)
    with pytest.raises(Unauthorized) as err:
        _check(authenticator, signed, _row(status=DeviceStatus.REVOKED), query="q=2")
    assert err.value.code == "invalid_signature"
    with pytest.raises(Unauthorized) as err:
        _check(authenticator, _signed(), _row(), body=b"other")
    assert err.value.code == "invalid_signature"
    assert err.value.detail == "the signature does not verify"


def test_revoked_device_is_403_before_skew_and_rate(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    with pytest.raises(Forbidden) as err:
        _check(
            authenticator,
            _signed(timestamp=int(time.time()) - 3600),
            _row(status=DeviceStatus.REVOKED),
        )
    assert err.value.code == "device_revoked"
    assert err.value.detail == "device dev-a has been revoked"
    # The refusal took no token of the rate limiter: three requests still pass.
    for _ in range(3):
        _check(authenticator, _signed(), _row())


def test_rate_limit_then_recovery(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    clock = Clock()
    authenticator.limiter = auth.RateLimiter(3, clock=clock)  # one token every 20 s
    for _ in range(3):
        _check(authenticator, _signed(), _row())
    with pytest.raises(RateLimited) as err:
        _check(authenticator, _signed(), _row())
    assert err.value.status_code == 429
    assert err.value.code == "rate_limited"
    assert err.value.headers == {"Retry-After": "20"}
    assert "exceeded 3 requests per minute; retry in 20 s" in err.value.detail
    # Another device is not limited by this one.
    _check(authenticator, _signed("dev-b"), _row("dev-b"))
    # A refused request took no token: after 19.5 s the wait is rounded up to 1 s, ...
    clock.now += 19.5
    with pytest.raises(RateLimited) as err:
        _check(authenticator, _signed(), _row())
    assert err.value.headers == {"Retry-After": "1"}
    # ... and after the announced time the device is served again.
    clock.now += 0.5
    assert _check(authenticator, _signed(), _row()).id == "dev-a"


def test_retry_after_is_at_least_one_second(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    clock = Clock()
    authenticator.limiter = auth.RateLimiter(600, clock=clock)  # one token every 0.1 s
    for _ in range(600):
        authenticator.limiter.acquire("dev-a")
    with pytest.raises(RateLimited) as err:
        _check(authenticator, _signed(), _row())
    assert err.value.headers == {"Retry-After": "1"}


def test_device_row_cache(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    assert authenticator.known_row("dev-a") is None
    authenticator.remember(_row(status=DeviceStatus.REVOKED))
    assert authenticator.known_row("dev-a") is None  # only active devices are remembered
    row = _row()
    authenticator.remember(row)
    assert authenticator.known_row("dev-a") == row
    authenticator.forget("dev-a")
    assert authenticator.known_row("dev-a") is None
    # A row read more than DEVICE_ROW_TTL_S ago serves only a request without a body ...
    authenticator.remember(row)
    authenticator._rows["dev-a"] = (row, time.monotonic() - auth.DEVICE_ROW_TTL_S - 1.0)
    assert authenticator.known_row("dev-a") is None
    assert authenticator.known_row("dev-a", bodyless=True) == row
    assert "dev-a" in authenticator._rows
    # ... and one read more than BODYLESS_ROW_TTL_S ago is dropped on the next look-up.
    authenticator._rows["dev-a"] = (row, time.monotonic() - auth.BODYLESS_ROW_TTL_S - 1.0)
    assert authenticator.known_row("dev-a", bodyless=True) is None
    assert "dev-a" not in authenticator._rows


def test_public_keys_are_parsed_once_and_refused_when_weak(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    text = signing.public_key_to_b64(KEY.public_key())
    first = authenticator._public_key(text)
    assert authenticator._public_key(text) is first
    weak = _row()
    weak = auth.DeviceRow(weak.id, weak.name, weak.status, "AQ" + "A" * 41 + "=")  # y = 1
    with pytest.raises(Unauthorized) as err:
        _check(authenticator, _signed(), weak)
    assert err.value.code == "invalid_signature"


def _enroll(runtime: Runtime, device_id: str, status: str = "active") -> None:
    key = KEY if device_id == "dev-a" else Ed25519PrivateKey.generate()
    with write_connection(runtime.engine) as conn:
        conn.execute(
            insert(Device).values(
                id=device_id,
                name=device_id,
                public_key=signing.public_key_to_b64(key.public_key()),
                status=status,
                enrolled_at=utcnow(),
            )
        )


def _nonces(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(UsedNonce)).scalar() or 0)


def _expired_nonce(runtime: Runtime, nonce: str) -> None:
    with write_connection(runtime.engine) as conn:
        conn.execute(
            insert(UsedNonce).values(
                device_id="dev-a", nonce=nonce, expires_at=utcnow() - timedelta(seconds=1)
            )
        )


@pytest.fixture
def fresh_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nonce and touch statements are built once per process and kept; these tests build
    them from scratch on their backend."""
    monkeypatch.setattr(auth, "_NONCE_STATEMENTS", {})
    monkeypatch.setattr(auth, "_TOUCH_STATEMENTS", {})


@pytest.mark.usefixtures("fresh_statements")
def test_nonce_is_recorded_once_and_expired_ones_are_pruned(tight_runtime: Runtime) -> None:
    rt = tight_runtime
    _enroll(rt, "dev-a")
    _expired_nonce(rt, "x" * 22)
    authenticator = auth.DeviceAuthenticator(rt)
    signed = _signed()
    claim = _check(authenticator, signed, _row()).claim
    assert claim is not None
    auth.settle_claim(rt, claim)  # the process's first record prunes the expired row
    assert claim.recorded and _nonces(rt) == 1
    with rt.engine.connect() as conn:
        device_id, nonce, expires = conn.execute(
            select(UsedNonce.device_id, UsedNonce.nonce, UsedNonce.expires_at)
        ).one()
    assert (device_id, nonce) == ("dev-a", signed.nonce)
    ttl = expires.replace(tzinfo=None) - utcnow().replace(tzinfo=None)
    assert timedelta(seconds=110) < ttl <= timedelta(seconds=120)  # twice the 60 s window
    auth.settle_claim(rt, claim)  # recorded: nothing more happens
    assert _nonces(rt) == 1
    again = _check(authenticator, signed, _row()).claim
    assert again is not None
    with pytest.raises(Unauthorized) as err:
        auth.settle_claim(rt, again)
    assert err.value.code == "replayed_nonce"
    assert not again.recorded
    # Within the prune interval an expired row stays ...
    _expired_nonce(rt, "y" * 22)
    other = _check(authenticator, _signed(), _row()).claim
    assert other is not None
    auth.settle_claim(rt, other)
    assert _nonces(rt) == 3
    # ... and a nonce past its expiry (twice the 60 s window) is taken over, not duplicated.
    later = utcnow() + timedelta(seconds=121)
    with write_connection(rt.engine) as conn:
        auth.record_nonce(conn, again, now=later)
    assert _nonces(rt) == 3
    with pytest.raises(Unauthorized), write_connection(rt.engine) as conn:
        auth.record_nonce(conn, again, now=later)


@pytest.mark.usefixtures("fresh_statements")
def test_touch_device_refuses_unknown_and_revoked(tight_runtime: Runtime) -> None:
    rt = tight_runtime
    _enroll(rt, "dev-a")
    _enroll(rt, "dev-r", status="revoked")
    now = utcnow()
    with write_connection(rt.engine) as conn:
        auth.touch_device(conn, "dev-a", now=now, count="num_assigned")
    with rt.engine.connect() as conn:
        seen, assigned = conn.execute(
            select(Device.last_seen_at, Device.num_assigned).where(Device.id == "dev-a")
        ).one()
    assert seen is not None and abs(seen.replace(tzinfo=None) - now.replace(tzinfo=None)) < (
        timedelta(seconds=1)
    )
    assert assigned == 1
    # Without a time only the counter moves.
    with write_connection(rt.engine) as conn:
        auth.touch_device(conn, "dev-a", now=None, count="num_completed")
    with rt.engine.connect() as conn:
        row = conn.execute(
            select(Device.last_seen_at, Device.num_assigned, Device.num_completed).where(
                Device.id == "dev-a"
            )
        ).one()
    assert (row[0], row[1], row[2]) == (seen, 1, 1)
    with pytest.raises(Unauthorized) as err, write_connection(rt.engine) as conn:
        auth.touch_device(conn, "nobody", now=now)
    assert (err.value.code, err.value.detail) == (
        "unknown_device",
        "no device 'nobody' is enrolled",
    )
    with pytest.raises(Forbidden) as err, write_connection(rt.engine) as conn:
        auth.touch_device(conn, "dev-r", now=now)
    assert (err.value.code, err.value.detail) == ("device_revoked", "device dev-r has been revoked")


def test_device_slots_limit_and_give_back() -> None:
    slots = auth.DeviceSlots(max_in_flight=2, max_long_polls=1, poll_retry_after_s=7)
    assert (slots.in_flight("a"), slots.long_polls("a")) == (0, 0)
    with slots.request("a"), slots.request("a"):
        assert slots.in_flight("a") == 2
        assert slots.in_flight("b") == 0
        with pytest.raises(RateLimited) as err, slots.request("a"):
            pass
        assert err.value.code == "too_many_requests"
        assert err.value.headers == {"Retry-After": "1"}
        assert err.value.detail == (
            "device a already has 2 requests in flight, its limit; retry in 1 s"
        )
        with slots.request("b"):  # another device has slots of its own
            assert slots.in_flight("b") == 1
        assert slots.in_flight("a") == 2  # the refusal took nothing
    assert slots.in_flight("a") == 0 and slots._in_flight == {}
    with slots.long_poll("a"):
        assert slots.long_polls("a") == 1 and slots.in_flight("a") == 0
        with pytest.raises(RateLimited) as err, slots.long_poll("a"):
            pass
        assert err.value.headers == {"Retry-After": "7"}
        assert err.value.detail == (
            "device a already has 1 work long-polls open, its limit; retry in 7 s"
        )
        with slots.long_poll("b"):
            assert slots.long_polls("b") == 1
    assert slots._long_polls == {}
    # A slot is given back when its block raises, too.
    with pytest.raises(KeyError), slots.request("a"):
        raise KeyError("handler failed")
    assert slots.in_flight("a") == 0


def test_forget_an_unknown_device_is_harmless(check_runtime: Runtime) -> None:
    authenticator = auth.DeviceAuthenticator(check_runtime)
    authenticator.forget("never-seen")
    assert authenticator.known_row("never-seen") is None


def test_deferred_claims_are_recorded_without_a_warning(
    coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """A work poll records its nonce in the handler's own transaction: it is refused when
    replayed, and the dependency's 'answered without recording its nonce' error is not
    logged (that line is for a handler that forgets its claim)."""
    caplog.set_level("ERROR", logger="fedge.coordinator.auth")
    with SignedDevice.enroll(coordinator) as device:
        request = device.build("GET", f"{API}/device/work", params={"wait": 0})
        assert device.send(request).status_code == 204
        replay = device.send(request)
        assert (replay.status_code, replay.json()["error"]) == (401, "replayed_nonce")
    assert [r.getMessage() for r in caplog.records if r.name == "fedge.coordinator.auth"] == []
