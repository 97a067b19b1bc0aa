"""Verification of signed device requests (docs/protocol.md, "Request signing").

A device request passes when, in this order:

1. the ``Authorization: Fedge ...`` header is present and well formed (401 ``invalid_signature``);
2. the device it names exists (401 ``unknown_device``) and is not revoked
   (403 ``device_revoked``): a read-only lookup made before any byte of the body is read, so
   a client naming a device that is not enrolled cannot make the coordinator take in a body.
   An active device's row is kept in memory for ``DEVICE_ROW_TTL_S`` (30 s; an hour,
   ``BODYLESS_ROW_TTL_S``, for a GET without a body, such as a paced check-in; its key never
   changes), so a busy device's requests make no lookup; a revocation through this process
   forgets it at once, one through another process is seen within the TTL here and at once
   by step 8 (which refuses the request, having read its body);
3. the device has fewer than ``device_max_in_flight`` requests in flight (429
   ``too_many_requests`` with ``Retry-After``; see "Slots" below);
4. the body fits ``max_upload_bytes`` (413 ``payload_too_large``, checked while it streams in);
5. the signature covers the request's method, path, query and body digest (401
   ``invalid_signature``), checked against the public key step 2 read (a device's key never
   changes); the device's existence and status are checked again in the transaction that
   records the nonce (step 8), for a device revoked meanwhile;
6. the timestamp lies within the skew window (401 ``clock_skew``);
7. the device is within its request rate (429 ``rate_limited`` with ``Retry-After``);
8. the nonce was not used by this device before (401 ``replayed_nonce``). Nonces are rows of
   ``used_nonces`` kept for twice the skew window, so a restart or another coordinator process
   does not reopen a replay window; a request older than the window fails step 6 instead.

A body larger than its route's limit by its ``Content-Length`` is refused with 413 even
before step 1 (:mod:`fedge.coordinator.api.bodylimit`). Since step 2 comes before the signature, a
revoked device is refused without one: whoever knows a device id learns that it is revoked,
as ``unknown_device`` already told whether it is enrolled.

Passing requests update the device's ``last_seen_at``. Steps 5-7 need no database: they run
on the event loop, outside any transaction (on SQLite: never under the write lock). Step 8
and ``last_seen_at`` (with the re-check of step 5) are written by :func:`record_claim`:

- ``DeviceDep`` (:func:`authenticate_device`) records them in a short transaction of their
  own before the handler runs, and holds no session afterwards (long-polls wait without a
  connection);
- ``DeviceClaimDep`` (:func:`authenticate_device_deferred`, the upload and the work poll)
  hands the handler a :class:`RequestClaim` instead, which the handler records in its own
  write transaction (one commit per request). A handler that answers without that
  transaction committing (a refusal, a repeated upload) records the claim in one of its own
  first (:func:`settle_claim`), and a replay or revocation found then is the answer. Either
  way no answer leaves before the nonce is recorded, and a nonce is recorded at most once
  (the unique constraint decides between concurrent replays), so replay protection is the
  same as with ``DeviceDep``.

The verified body is cached on the request, so handlers read it again with ``await
request.body()`` (or take it from :attr:`DeviceIdentity.body`).

Slots (:class:`DeviceSlots`): one device may have ``device_max_in_flight`` requests in flight
and ``device_max_long_polls`` work long-polls open, per coordinator process. The device id is
claimed before it is proven, and the request slot must be taken before the body is read (the
body is what the signature covers), so it is taken after step 2 for an enrolled, active
device, and given back when the request ends, at once when verification fails. Someone who
forges an enrolled device's id can therefore hold that device's request slots while trickling
a body in, but no more than ``device_max_in_flight`` per device id they know, and never a slot
of a device id that is not enrolled; counting only verified requests would instead let one
client fill every device's share with slow bodies. Long-poll slots are taken after
verification (:func:`fedge.coordinator.api.device_work.work`), so a forger cannot take them.

The rate limit is a token bucket per device and per coordinator process (capacity
``device_rate_per_minute``, refilled continuously); several replicas each apply it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import (
    BindParameter,
    Connection,
    Insert,
    Update,
    bindparam,
    delete,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fedge.coordinator.db import READ_ONLY, utcnow, write_connection
from fedge.coordinator.errors import Forbidden, PayloadTooLarge, RateLimited, Unauthorized
from fedge.coordinator.models import Device, UsedNonce
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.states import DeviceStatus
from fedge.shared.signing import (
    SignatureError,
    SignedHeaders,
    check_skew,
    parse_signed_headers,
    public_key_from_b64,
    verify_request,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

#: How often (seconds) one process deletes expired nonces.
NONCE_PRUNE_INTERVAL_S = 60.0
#: ``Retry-After`` (seconds) of a request refused for want of a free slot of its device.
SLOT_RETRY_AFTER_S = 1


@dataclass
class RequestClaim:
    """What a verified request still has to write: its nonce (step 8) and the device's
    ``last_seen_at`` (with the re-check of its status). ``recorded`` once committed."""

    device_id: str
    nonce: str
    ttl: timedelta
    authenticator: DeviceAuthenticator = field(repr=False)
    recorded: bool = False


@dataclass(frozen=True)
class DeviceIdentity:
    """The device a verified request came from, and the exact body that was signed.

    ``claim`` is set by ``DeviceClaimDep`` only: the handler must record it
    (:func:`record_claim` in its own transaction, or :func:`settle_claim`) before answering."""

    id: str
    name: str
    body: bytes = field(repr=False, default=b"")
    claim: RequestClaim | None = field(repr=False, default=None)


class RateLimiter:
    """Token buckets keyed by device: ``per_minute`` burst, refilled at ``per_minute/60``/s."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token; 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


#: Parsed public keys kept per process (a device's key never changes; bounded anyway).
KEY_CACHE_SIZE = 65536
#: How long a process trusts its memory that a device is enrolled and active (step 2) before
#: reading the row again. The status is checked again in the transaction that records the
#: nonce (step 8), so this only bounds how long a device revoked through another process can
#: still get a body read before it is refused.
DEVICE_ROW_TTL_S = 30.0
#: The same for a request without a body (a paced check-in comes every few minutes): the row
#: serves only for the signature, no body is read on its word, and the device's status is
#: checked again where the nonce is recorded, as for every request.
BODYLESS_ROW_TTL_S = 3600.0


def _nonce_statement(dialect: str) -> Insert:
    """``INSERT ... ON CONFLICT DO UPDATE ... WHERE expires_at < now RETURNING nonce`` with
    bound parameters ``p_device``, ``p_nonce``, ``p_expires`` and ``p_now`` (built once; the
    parameters take the type of the column they are assigned to or compared with, so
    datetimes go through ``UTCDateTime``)."""
    stmt = _NONCE_STATEMENTS.get(dialect)
    if stmt is not None:
        return stmt
    values: dict[str, BindParameter[Any]] = {
        "device_id": bindparam("p_device"),
        "nonce": bindparam("p_nonce"),
        "expires_at": bindparam("p_expires"),
    }
    now: BindParameter[datetime] = bindparam("p_now")
    if dialect == "postgresql":
        pg = postgresql.insert(UsedNonce).values(values)
        stmt = pg.on_conflict_do_update(
            index_elements=[UsedNonce.device_id, UsedNonce.nonce],
            set_={"expires_at": pg.excluded.expires_at},
            where=UsedNonce.expires_at < now,
        )
    elif dialect == "sqlite":
        lite = sqlite.insert(UsedNonce).values(values)
        stmt = lite.on_conflict_do_update(
            index_elements=[UsedNonce.device_id, UsedNonce.nonce],
            set_={"expires_at": lite.excluded.expires_at},
            where=UsedNonce.expires_at < now,
        )
    else:  # pragma: no cover - fedge supports SQLite and PostgreSQL
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    stmt = stmt.returning(UsedNonce.nonce)
    _NONCE_STATEMENTS[dialect] = stmt
    return stmt


_NONCE_STATEMENTS: dict[str, Insert] = {}


def _insert_nonce(
    session: Session | Connection, device_id: str, nonce: str, *, now: datetime, ttl: timedelta
) -> bool:
    """Record a nonce in one statement; False when it is in use (a replay).

    An expired row of the same nonce (kept until the next prune) is taken over, as the
    separate delete-then-insert did before: ``INSERT ... ON CONFLICT DO UPDATE ... WHERE
    expires_at < now`` changes no row exactly when the nonce is still live.
    """
    bind = session if isinstance(session, Connection) else session.get_bind()
    params = {"p_device": device_id, "p_nonce": nonce, "p_expires": now + ttl, "p_now": now}
    stmt = _nonce_statement(bind.dialect.name)
    return session.execute(stmt, params).first() is not None


class DeviceAuthenticator:
    """Per-process state of device verification: the rate limiter, the prune clock and a
    cache of parsed public keys (keyed by the stored base64 text, so a changed row is
    parsed again). ``clock`` (monotonic seconds) drives the limiter, the row cache's ages and
    the prune interval."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter(runtime.settings.device_rate_per_minute, clock=clock)
        self._clock = clock
        self._last_prune = -math.inf
        self._prune_lock = threading.Lock()
        self._keys: dict[str, Ed25519PublicKey] = {}
        #: Active devices' rows (step 2) by id, with the monotonic time they were read.
        self._rows: dict[str, tuple[DeviceRow, float]] = {}

    def known_row(self, device_id: str, *, bodyless: bool = False) -> DeviceRow | None:
        """The row of an enrolled, active device read less than ``DEVICE_ROW_TTL_S`` ago
        (``BODYLESS_ROW_TTL_S`` for a request without a body)."""
        found = self._rows.get(device_id)
        if found is None:
            return None
        age = self._clock() - found[1]
        if age >= BODYLESS_ROW_TTL_S:
            self._rows.pop(device_id, None)
            return None
        if age >= DEVICE_ROW_TTL_S and not bodyless:
            return None
        return found[0]

    def remember(self, row: DeviceRow) -> None:
        """Keep an active device's row for the next requests (its key never changes)."""
        if row.status != DeviceStatus.ACTIVE:
            return
        if len(self._rows) >= KEY_CACHE_SIZE:
            self._rows.clear()
        self._rows[row.id] = (row, self._clock())

    def forget(self, device_id: str) -> None:
        """Drop a device's row (revoked through this process: refused at step 2 at once)."""
        self._rows.pop(device_id, None)

    def _public_key(self, text: str) -> Ed25519PublicKey:
        key = self._keys.get(text)
        if key is None:
            key = public_key_from_b64(text)
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.clear()
            self._keys[text] = key
        return key

    def _prune_due(self) -> bool:
        now = self._clock()
        with self._prune_lock:
            if now - self._last_prune < NONCE_PRUNE_INTERVAL_S:
                return False
            self._last_prune = now
            return True

    def check(
        self,
        signed: SignedHeaders,
        device: DeviceRow,
        *,
        method: str,
        path: str,
        query: str,
        body: bytes,
    ) -> DeviceIdentity:
        """Steps 5-7 of the module docstring (no database); raises an ApiError. The identity
        carries the claim of step 8, not yet recorded."""
        settings = self.runtime.settings
        window = settings.signature_skew_s
        try:
            verify_request(
                self._public_key(device.public_key),
                signed,
                method=method,
                path=path,
                query=query,
                body_sha256=hashlib.sha256(body).hexdigest(),
            )
        except SignatureError as exc:
            raise Unauthorized(exc.detail, code=exc.code) from None
        if device.status == DeviceStatus.REVOKED:
            raise Forbidden(f"device {device.id} has been revoked", code="device_revoked")
        try:
            check_skew(signed.timestamp, window_s=window)
        except SignatureError as exc:
            raise Unauthorized(exc.detail, code=exc.code) from None
        wait = self.limiter.acquire(device.id)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise RateLimited(
                f"device {device.id} exceeded {settings.device_rate_per_minute} "
                f"requests per minute; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        claim = RequestClaim(
            device_id=device.id,
            nonce=signed.nonce,
            ttl=timedelta(seconds=2 * window),
            authenticator=self,
        )
        return DeviceIdentity(id=device.id, name=device.name, body=body, claim=claim)


@dataclass(frozen=True)
class DeviceRow:
    """What step 2 reads of a device."""

    id: str
    name: str
    status: DeviceStatus
    public_key: str


def record_nonce(conn: Connection, claim: RequestClaim, *, now: datetime) -> None:
    """Step 8 in the caller's transaction: 401 ``replayed_nonce`` when the nonce is in use.
    (Every so often the expired nonces are deleted first.) Nothing else is locked, so it may
    come first in any transaction."""
    if claim.authenticator._prune_due():
        conn.execute(delete(UsedNonce).where(UsedNonce.expires_at < now))
    if not _insert_nonce(conn, claim.device_id, claim.nonce, now=now, ttl=claim.ttl):
        raise Unauthorized(
            "this nonce was already used; sign every request with a fresh nonce",
            code="replayed_nonce",
        )


def _touch_statement(count: str | None, seen: bool) -> Update:
    key = (count, seen)
    stmt = _TOUCH_STATEMENTS.get(key)
    if stmt is None:
        values: dict[str, Any] = {}
        if seen:
            values["last_seen_at"] = bindparam("p_seen")
        if count is not None:
            values[count] = getattr(Device, count) + 1
        stmt = (
            update(Device)
            .where(Device.id == bindparam("p_device"), Device.status == DeviceStatus.ACTIVE)
            .values(**values)
        )
        _TOUCH_STATEMENTS[key] = stmt
    return stmt


_TOUCH_STATEMENTS: dict[tuple[str | None, bool], Update] = {}
_DEVICE_STATUS = select(Device.status).where(Device.id == bindparam("p_device"))


def touch_device(
    conn: Connection, device_id: str, *, now: datetime | None, count: str | None = None
) -> None:
    """Set the device's ``last_seen_at`` (unless ``now`` is None) and add one to its counter
    ``count`` (``num_assigned``, ``num_completed``) in one statement, if it is still enrolled
    and active: 401 ``unknown_device`` / 403 ``device_revoked`` otherwise. It row-locks the
    device (on PostgreSQL), so it comes where the engine's lock order puts device rows
    (docs/rounds.md, "Concurrency"): after any task row."""
    params: dict[str, Any] = {"p_device": device_id}
    if now is not None:
        params["p_seen"] = now
    done = conn.execute(_touch_statement(count, now is not None), params)
    if done.rowcount == 1:
        return
    status = conn.execute(_DEVICE_STATUS, {"p_device": device_id}).scalar()
    if status is None:
        raise Unauthorized(f"no device {device_id!r} is enrolled", code="unknown_device")
    raise Forbidden(f"device {device_id} has been revoked", code="device_revoked")


def record_claim(conn: Connection, claim: RequestClaim, *, now: datetime) -> None:
    """Step 8 and ``last_seen_at`` in the caller's transaction (for a handler that takes no
    other row lock before the device's)."""
    record_nonce(conn, claim, now=now)
    touch_device(conn, claim.device_id, now=now)


def settle_claim(runtime: Runtime, claim: RequestClaim | None) -> None:
    """Record the claim in a transaction of its own unless a handler's transaction already
    committed it (blocking). A replayed nonce or a device revoked meanwhile raises here and
    is the request's answer."""
    if claim is None or claim.recorded:
        return
    with write_connection(runtime.engine) as conn:
        record_claim(conn, claim, now=utcnow())
    claim.recorded = True


def get_authenticator(runtime: Runtime) -> DeviceAuthenticator:
    """The process's authenticator (made on first use, on the event loop)."""
    if runtime.authenticator is None:
        runtime.authenticator = DeviceAuthenticator(runtime)
    return runtime.authenticator


class DeviceSlots:
    """Requests in flight and open work long-polls per device, in one coordinator process.

    Slots are taken and given back by async code on the event loop only, so no lock is
    needed; a device's entries are dropped when its last slot is given back.
    """

    def __init__(self, *, max_in_flight: int, max_long_polls: int, poll_retry_after_s: int):
        self.max_in_flight = max_in_flight
        self.max_long_polls = max_long_polls
        self.poll_retry_after_s = poll_retry_after_s
        self._in_flight: dict[str, int] = {}
        self._long_polls: dict[str, int] = {}

    def in_flight(self, device_id: str) -> int:
        return self._in_flight.get(device_id, 0)

    def long_polls(self, device_id: str) -> int:
        return self._long_polls.get(device_id, 0)

    def request(self, device_id: str) -> _Slot:
        """A request slot of ``device_id`` for a ``with`` block, or 429 ``too_many_requests``."""
        return _Slot(
            self._in_flight,
            device_id,
            self.max_in_flight,
            what="requests in flight",
            retry_after_s=SLOT_RETRY_AFTER_S,
        )

    def long_poll(self, device_id: str) -> _Slot:
        """A long-poll slot of ``device_id`` for a ``with`` block, or 429
        ``too_many_requests``. ``Retry-After`` is one re-check period: a poll whose client
        vanished without a word is noticed, and its slot given back, within that time."""
        return _Slot(
            self._long_polls,
            device_id,
            self.max_long_polls,
            what="work long-polls open",
            retry_after_s=self.poll_retry_after_s,
        )


class _Slot:
    """Taken on entering the ``with`` block (or refused), given back on leaving it."""

    def __init__(
        self, counts: dict[str, int], key: str, limit: int, *, what: str, retry_after_s: int
    ) -> None:
        self.counts, self.key, self.limit = counts, key, limit
        self.what, self.retry_after_s = what, retry_after_s

    def __enter__(self) -> None:
        held = self.counts.get(self.key, 0)
        if held >= self.limit:
            raise RateLimited(
                f"device {self.key} already has {held} {self.what}, its limit; "
                f"retry in {self.retry_after_s} s",
                code="too_many_requests",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.counts[self.key] = held + 1

    def __exit__(self, *exc: object) -> None:
        held = self.counts[self.key] - 1
        if held:
            self.counts[self.key] = held
        else:
            del self.counts[self.key]


def get_device_slots(runtime: Runtime) -> DeviceSlots:
    """The process's per-device slots (made on first use, on the event loop)."""
    if runtime.slots is None:
        settings = runtime.settings
        runtime.slots = DeviceSlots(
            max_in_flight=settings.device_max_in_flight,
            max_long_polls=settings.device_max_long_polls,
            poll_retry_after_s=max(1, math.ceil(settings.long_poll_recheck_s)),
        )
    return runtime.slots


_DEVICE_ROW = select(Device.name, Device.status, Device.public_key).where(
    Device.id == bindparam("p_device")
)


def _device_row(runtime: Runtime, device_id: str) -> DeviceRow | None:
    """Step 2's lookup (one read-only statement, no write lock): None when no such device
    is enrolled."""
    with runtime.engine.connect() as conn:
        conn = conn.execution_options(**READ_ONLY)
        row = conn.execute(_DEVICE_ROW, {"p_device": device_id}).first()
        conn.rollback()
    if row is None:
        return None
    return DeviceRow(id=device_id, name=row[0], status=row[1], public_key=row[2])


async def read_body(request: Request, *, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes.

    The body is cached on the request (as Starlette's ``Request.body`` does), so later readers
    (``await request.body()``) get the same bytes without reading the stream again.
    """
    cached = getattr(request, "_body", None)
    if isinstance(cached, bytes):
        if len(cached) > limit:
            raise PayloadTooLarge(f"body of {len(cached)} bytes exceeds the limit of {limit}")
        return cached
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache attribute
    return body


@asynccontextmanager
async def _verified(request: Request) -> AsyncIterator[DeviceIdentity]:
    """Steps 1-7; the device's request slot is held while the caller's ``async with`` runs."""
    runtime: Runtime = request.app.state.runtime
    try:
        signed = parse_signed_headers(request.headers)
    except SignatureError as exc:
        raise Unauthorized(exc.detail, code=exc.code) from None
    request.scope["fedge.device"] = signed.device_id  # the claimed id, for the request's logs
    authenticator = get_authenticator(runtime)
    bodyless = (
        request.method == "GET"
        and request.headers.get("content-length", "0") == "0"
        and "transfer-encoding" not in request.headers
    )
    device = authenticator.known_row(signed.device_id, bodyless=bodyless)
    if device is None:
        device = await run_in_threadpool(_device_row, runtime, signed.device_id)
        if device is None:
            raise Unauthorized(f"no device {signed.device_id!r} is enrolled", code="unknown_device")
        if device.status == DeviceStatus.REVOKED:
            raise Forbidden(f"device {signed.device_id} has been revoked", code="device_revoked")
        authenticator.remember(device)
    with get_device_slots(runtime).request(signed.device_id):
        body = await read_body(request, limit=runtime.settings.max_upload_bytes)
        # A signature check costs less CPU than a hop to a worker thread and back.
        yield authenticator.check(
            signed,
            device,
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            body=body,
        )


async def authenticate_device(request: Request) -> AsyncIterator[DeviceIdentity]:
    """FastAPI dependency behind ``DeviceDep``: verify the signed request and record its
    nonce and ``last_seen_at`` (a transaction of their own), or raise. The device's request
    slot is held until the request ends (FastAPI closes the dependency after the response),
    and given back at once when verification fails."""
    runtime: Runtime = request.app.state.runtime
    async with _verified(request) as identity:
        await run_in_threadpool(settle_claim, runtime, identity.claim)
        yield DeviceIdentity(id=identity.id, name=identity.name, body=identity.body)


async def authenticate_device_deferred(request: Request) -> AsyncIterator[DeviceIdentity]:
    """FastAPI dependency behind ``DeviceClaimDep``: verify the signed request (steps 1-7)
    and leave step 8 and ``last_seen_at`` to the handler's own transaction
    (:attr:`DeviceIdentity.claim`; see the module docstring)."""
    runtime: Runtime = request.app.state.runtime
    async with _verified(request) as identity:
        claim = identity.claim
        try:
            yield identity
        except Exception:
            # The handler refused the request (its transaction, if any, rolled back): the
            # nonce is recorded now, before the refusal is answered; a replay or a
            # revocation found then is the answer instead.
            await run_in_threadpool(settle_claim, runtime, claim)
            raise
        if claim is not None and not claim.recorded:  # a handler bug: say so loudly
            log.error(
                "device request answered without recording its nonce",
                extra={"device": identity.id, "path": request.url.path},
            )
