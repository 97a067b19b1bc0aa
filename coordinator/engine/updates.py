"""Accepting an uploaded update (``POST /device/assignments/{id}/update``).

Order of checks (each rejection changes nothing):

1. a repeated ``Idempotency-Key`` of this device answers the first result (200);
2. the assignment exists (404) and belongs to the device (403 ``not_your_assignment``), has
   no update yet (409 ``already_uploaded``), its task is running (409 ``task_not_running``);
3. the body decodes and matches the task's spec and compression policy (400 wire codes,
   422 ``shape_mismatch``/``policy_mismatch``), its header names the assignment's task and base
   version (422 ``task_mismatch``/``base_version_mismatch``), ``num_examples >= 1`` and at
   most the task's ``max_num_examples`` (422 ``num_examples_out_of_range``), and no value's
   magnitude exceeds ``max_update_abs`` (422 ``update_out_of_range``), and with a norm bound
   whose action is ``refuse`` its L2 norm is at most ``max_norm`` (422
   ``update_norm_exceeded``; the device's ``num_norm_refused`` counts it, nothing else changes);
4. staleness ``tau = current_version - base_version`` is within ``max_staleness``
   (409 ``stale_update``).

Then the body is stored and the ``Update`` row committed before the answer: a body of at most
``inline_update_max_bytes`` as blob rows of the coordinator's database in the same transaction
as the row (:meth:`fedge.coordinator.blobstore.BlobStore.put_in`: both commit, or neither), a
larger one in the blob store first (written and fsynced), then the row. A race between two
requests with the same key or for the same assignment ends in the unique constraints; the loser
re-reads and answers like a repeat.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedge.coordinator.auth import RequestClaim, record_nonce, settle_claim, touch_device
from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.db import READ_ONLY, in_states, session_scope, utcnow, write_connection
from fedge.coordinator.engine import bounds, examples, rounds
from fedge.coordinator.engine.aggregate import max_abs
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.ownership import own_assignment
from fedge.coordinator.engine.staleness import update_weight
from fedge.coordinator.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from fedge.coordinator.events import Event, publish
from fedge.coordinator.models import Assignment, Device, Round, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.device_work import UploadAccepted
from fedge.coordinator.states import UPDATE_COUNTED, AssignmentStatus, TaskStatus, UpdateStatus
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import DecodedUpdate, WireFormatError, decode_update

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: Wire codes answered with 422 (well-formed data that does not fit this task); the rest 400.
UNPROCESSABLE_WIRE_CODES = frozenset({"shape_mismatch", "policy_mismatch"})


@dataclass(frozen=True)
class _Context:
    task_id: int
    base_version: int
    current_version: int
    spec: ModelSpec
    policy: CompressionPolicy
    config: AggregationConfig


def check_idempotency_key(key: str | None) -> str:
    if not key:
        raise BadRequest(
            "send an Idempotency-Key header (1..128 of A-Z a-z 0-9 _ . -) with every upload",
            code="missing_idempotency_key",
        )
    if not IDEMPOTENCY_KEY.match(key):
        raise BadRequest("Idempotency-Key must be 1..128 characters of A-Z a-z 0-9 _ . -")
    return key


def _config(task: Task) -> AggregationConfig:
    try:
        return AggregationConfig.from_dict(task.aggregation)
    except ConfigError as exc:
        raise Conflict(
            f"task {task.id} has an unusable configuration: {exc}", code="task_not_running"
        ) from None


def _first_result(session: Session, u: Update) -> UploadAccepted:
    """The answer the first upload got (its weight recomputed from the staleness at
    acceptance, since the stored weight becomes the one used at aggregation)."""
    task = session.get(Task, u.task_id)
    assert task is not None
    cfg = _config(task)
    counted = examples.stored_count(
        u.num_examples_counted, u.num_examples, cap=cfg.max_num_examples
    )
    weight = update_weight(
        cfg.staleness, tau=u.staleness, num_examples=counted, weighting=cfg.weighting
    )
    assert u.assignment_id is not None
    return UploadAccepted(
        update_id=u.id,
        assignment_id=u.assignment_id,
        task_id=u.task_id,
        base_version=u.base_version,
        staleness=u.staleness,
        weight=weight,
        status=UpdateStatus.ACCEPTED,
        duplicate=True,
        num_examples_counted=counted,
    )


def _repeat(
    session: Session, *, device_id: str, key: str, assignment_id: int
) -> UploadAccepted | None:
    u = session.scalar(
        select(Update).where(Update.device_id == device_id, Update.idempotency_key == key)
    )
    if u is None:
        return None
    return _same_assignment_result(session, u, assignment_id=assignment_id, key=key)


def _same_assignment_result(
    session: Session, u: Update, *, assignment_id: int, key: str
) -> UploadAccepted:
    """The first answer to the upload ``u`` made with ``key``, or 409 when that key was used
    for another assignment."""
    if u.assignment_id != assignment_id:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for assignment {u.assignment_id}; "
            "use a fresh key for each update"
        )
    return _first_result(session, u)


def _check_assignment(
    session: Session, *, device_id: str, assignment_id: int
) -> tuple[Assignment, Task]:
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id)
    if session.scalar(select(Update.id).where(Update.assignment_id == a.id)) is not None:
        raise Conflict(f"assignment {assignment_id} already has an update", code="already_uploaded")
    task = session.get(Task, a.task_id)
    assert task is not None
    if task.status != TaskStatus.RUNNING:
        raise Conflict(f"task {task.id} is {task.status}, not running", code="task_not_running")
    return a, task


def _check_staleness(cfg: AggregationConfig, *, current: int, base: int) -> int:
    tau = max(0, current - base)
    if tau > cfg.max_staleness:
        raise Conflict(
            f"update on version {base} is {tau} versions behind the current version {current}; "
            f"the task accepts at most {cfg.max_staleness}. The assignment is cancelled: "
            "discard the update and fetch new work.",
            code="stale_update",
        )
    return tau


def decode_checked(body: bytes, ctx: _Context) -> DecodedUpdate:
    """Step 3 of the module docstring."""
    try:
        decoded = decode_update(body, spec=ctx.spec, policy=ctx.policy)
    except WireFormatError as exc:
        if exc.code in UNPROCESSABLE_WIRE_CODES:
            raise Unprocessable(exc.detail, code=exc.code) from None
        raise BadRequest(exc.detail, code=exc.code) from None
    if decoded.task_id != ctx.task_id:
        raise Unprocessable(
            f"the update is for task {decoded.task_id}, the assignment for task {ctx.task_id}",
            code="task_mismatch",
        )
    if decoded.base_version != ctx.base_version:
        raise Unprocessable(
            f"the update was trained on version {decoded.base_version}, the assignment is on "
            f"version {ctx.base_version}",
            code="base_version_mismatch",
        )
    if decoded.num_examples < 1:
        raise Unprocessable("num_examples must be at least 1")
    examples.check_claim(decoded.num_examples, cap=ctx.config.max_num_examples)
    largest = max_abs(decoded)
    if largest > ctx.config.max_update_abs:
        raise Unprocessable(
            f"the update carries a value of magnitude {largest:.6g}; this task accepts at most "
            f"{ctx.config.max_update_abs:.6g} (aggregation.max_update_abs)",
            code="update_out_of_range",
        )
    limit = ctx.config.norm_bound
    if limit is not None and limit.action == "refuse":
        norm = bounds.update_norm(decoded)
        if norm > limit.max_norm:
            raise Unprocessable(
                f"the update's L2 norm is {norm:.6g}; this task refuses updates above "
                f"{limit.max_norm:.6g} (aggregation.norm_bound)",
                code="update_norm_exceeded",
            )
    return decoded


_NORM_REFUSED = (
    update(Device)
    .where(Device.id == bindparam("p_device"))
    .values(num_norm_refused=func.coalesce(Device.num_norm_refused, 0) + 1)
)


def count_norm_refusal(runtime: Runtime, device_id: str) -> None:
    """Count an upload refused for its norm on the device (its own short transaction)."""
    with write_connection(runtime.engine) as conn:
        conn.execute(_NORM_REFUSED, {"p_device": device_id})


def lock_for_upload(
    session: Session, *, device_id: str, assignment_id: int
) -> tuple[Assignment, Task]:
    """Lock what an upload decides on, in the engine's lock order (docs/rounds.md,
    "Concurrency"), and read it fresh: the task row ``FOR SHARE`` (uploads of a task run
    side by side, but not while an engine transaction holds the task: its status and version
    cannot move under this upload), then the device row, then the assignment row, so the
    status read here is the latest and nobody ends the assignment before this commits.
    SQLite's write lock serializes it all anyway."""
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id)
    task = session.scalar(
        select(Task)
        .where(Task.id == a.task_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    assert task is not None
    rounds.lock_devices(session, [device_id])
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id, for_update=True)
    return a, task


def end_stale_assignment(runtime: Runtime, *, device_id: str, assignment_id: int) -> None:
    """Cancel an assignment whose upload was refused as too stale: its work can never be
    accepted, so the device must not get it again (it gets new work on the current version
    instead). Cancelled, not dropped: the version moved on, the device did deliver."""
    with session_scope(runtime.sessions) as session:
        a, _ = lock_for_upload(session, device_id=device_id, assignment_id=assignment_id)
        rounds.end_assignments(session, [a], status=AssignmentStatus.CANCELLED, now=utcnow())


_REPEAT = select(Update.id).where(
    Update.device_id == bindparam("p_device"), Update.idempotency_key == bindparam("p_key")
)
_ASSIGNMENT_AND_TASK = (
    select(
        Assignment.device_id,
        Assignment.task_id,
        Assignment.base_version,
        Task.status,
        Task.current_version,
        Task.updated_at,
        select(Update.id).where(Update.assignment_id == Assignment.id).scalar_subquery(),
        # This key's earlier update (a repeat), read in the same statement.
        select(Update.id)
        .where(
            Update.device_id == bindparam("p_device"),
            Update.idempotency_key == bindparam("p_key"),
        )
        .scalar_subquery(),
    )
    .join(Task, Task.id == Assignment.task_id)
    .where(Assignment.id == bindparam("p_assignment"))
)
# The upload's write transaction, in the engine's lock order (docs/rounds.md, "Concurrency").
_TASK_FOR_SHARE = (
    select(Task.status, Task.current_version)
    .where(Task.id == bindparam("p_task"))
    .with_for_update(read=True)
)
_ASSIGNMENT_FOR_UPDATE = (
    select(
        Assignment.device_id,
        Assignment.status,
        Assignment.round_id,
        Assignment.metrics,
        Assignment.decline_reason,
    )
    .where(Assignment.id == bindparam("p_assignment"))
    .with_for_update(key_share=True)
)
_HISTORY = (
    select(Update.num_examples_counted, Update.num_examples)
    .where(
        Update.task_id == bindparam("p_task"),
        Update.device_id == bindparam("p_device"),
        in_states(Update.status, UPDATE_COUNTED),
    )
    .order_by(Update.id.desc())
    .limit(examples.HISTORY)
)
_INSERT_UPDATE = insert(Update).returning(Update.id)
_END_ASSIGNMENT = (
    update(Assignment)
    .where(Assignment.id == bindparam("p_assignment"))
    .values(status=AssignmentStatus.UPLOADED, finished_at=bindparam("p_finished"))
)
_END_ASSIGNMENT_WITH_METRICS = _END_ASSIGNMENT.values(metrics=bindparam("p_metrics"))
_PENDING = select(func.count(Update.id)).where(
    Update.task_id == bindparam("p_task"), Update.status == UpdateStatus.ACCEPTED
)
_PENDING_ON_BASE = _PENDING.where(Update.base_version == bindparam("p_base"))
_DEVICE_COMPLETED = (
    update(Device)
    .where(Device.id == bindparam("p_device"))
    .values(num_completed=Device.num_completed + 1)
)


def _repeat_id(conn: Connection, *, device_id: str, key: str) -> int | None:
    found = conn.execute(_REPEAT, {"p_device": device_id, "p_key": key}).scalar()
    return None if found is None else int(found)


def _precheck(runtime: Runtime, *, device_id: str, assignment_id: int, key: str) -> _Context | int:
    """Steps 1-2 of the module docstring in one read-only transaction (no write lock): the
    context to decode against, or the id of this key's earlier update (a repeat)."""
    with runtime.engine.connect() as conn:
        conn = conn.execution_options(**READ_ONLY)
        try:
            row = conn.execute(
                _ASSIGNMENT_AND_TASK,
                {"p_assignment": assignment_id, "p_device": device_id, "p_key": key},
            ).first()
            if row is None:
                repeat = _repeat_id(conn, device_id=device_id, key=key)
                if repeat is not None:
                    return repeat
                raise NotFound(f"no assignment {assignment_id}")
            owner, task_id, base, task_status, current, updated_at, uploaded, repeat = row
            if repeat is not None:
                return int(repeat)
            if owner != device_id:
                raise Forbidden(
                    f"assignment {assignment_id} belongs to another device",
                    code="not_your_assignment",
                )
            if uploaded is not None:
                # On PostgreSQL every statement reads the latest commit: the update found
                # here may be a concurrent request's with this key, committed after the look
                # above.
                repeat = _repeat_id(conn, device_id=device_id, key=key)
                if repeat is not None:
                    return repeat
                raise Conflict(
                    f"assignment {assignment_id} already has an update", code="already_uploaded"
                )
            if task_status != TaskStatus.RUNNING:
                raise Conflict(
                    f"task {task_id} is {task_status}, not running", code="task_not_running"
                )
            parsed = runtime.task_configs.lookup(conn, task_id, updated_at)
        finally:
            conn.rollback()
    if parsed.config is None:
        raise Conflict(
            f"task {task_id} has an unusable configuration: {parsed.config_error}",
            code="task_not_running",
        )
    return _Context(
        task_id=task_id,
        base_version=base,
        current_version=current,
        spec=parsed.spec,
        policy=parsed.policy,
        config=parsed.config,
    )


def _answer_repeat(
    runtime: Runtime, update_id: int, *, assignment_id: int, key: str
) -> UploadAccepted:
    with session_scope(runtime.sessions, read_only=True) as session:
        u = session.get(Update, update_id)
        assert u is not None
        return _same_assignment_result(session, u, assignment_id=assignment_id, key=key)


def _record_core(
    conn: Connection,
    ctx: _Context,
    claim: RequestClaim | None,
    *,
    device_id: str,
    assignment_id: int,
    key: str,
    decoded: DecodedUpdate,
    digest: str,
    size: int,
    now: datetime,
) -> tuple[UploadAccepted, int]:
    """The upload's write transaction in SQLAlchemy Core: the request's nonce (``claim``),
    then in the engine's lock order the task row (``FOR SHARE``), the device row (its
    ``last_seen_at`` and ``num_completed`` in one statement, which also re-checks that it is
    active) and the assignment row, then the ``updates`` row. A repeat or a second upload for
    this assignment that committed since the pre-check ends in the unique constraints
    (device_id, idempotency_key) and (assignment_id); the caller then answers it like a
    repeat or a conflict."""
    if claim is not None:
        record_nonce(conn, claim, now=now)
    task = conn.execute(_TASK_FOR_SHARE, {"p_task": ctx.task_id}).one()
    if task.status != TaskStatus.RUNNING:
        raise Conflict(f"task {ctx.task_id} is {task.status}, not running", code="task_not_running")
    cfg = ctx.config
    tau = _check_staleness(cfg, current=task.current_version, base=ctx.base_version)
    if claim is not None:
        touch_device(conn, device_id, now=now, count="num_completed")
    else:
        conn.execute(_DEVICE_COMPLETED, {"p_device": device_id})
    a = conn.execute(_ASSIGNMENT_FOR_UPDATE, {"p_assignment": assignment_id}).one()
    if a.device_id != device_id:  # an assignment never changes hands; checked before
        raise Forbidden(
            f"assignment {assignment_id} belongs to another device", code="not_your_assignment"
        )
    if a.decline_reason is not None:  # its place went to another device
        raise Conflict(
            f"assignment {assignment_id} was declined; its work is no longer wanted",
            code="assignment_declined",
        )
    history = conn.execute(_HISTORY, {"p_task": ctx.task_id, "p_device": device_id}).all()
    counted = examples.bounded_by_history(
        decoded.num_examples,
        [examples.stored_count(c, n, cap=cfg.max_num_examples) for c, n in history],
    )
    weight = update_weight(cfg.staleness, tau=tau, num_examples=counted, weighting=cfg.weighting)
    # Metrics carried in the update join (and override) any the device reported before.
    metrics = {**(a.metrics or {}), **decoded.metrics}
    update_id = conn.execute(
        _INSERT_UPDATE,
        {
            "task_id": ctx.task_id,
            "assignment_id": assignment_id,
            "device_id": device_id,
            "round_id": a.round_id,
            "base_version": ctx.base_version,
            "num_examples": decoded.num_examples,
            "num_examples_counted": counted,
            "blob_digest": digest,
            "byte_size": size,
            "staleness": tau,
            "weight": weight,
            "status": UpdateStatus.ACCEPTED,
            "idempotency_key": key,
            "received_at": now,
            "metrics": metrics,
        },
    ).scalar_one()
    if decoded.metrics:
        conn.execute(
            _END_ASSIGNMENT_WITH_METRICS,
            {"p_assignment": assignment_id, "p_finished": now, "p_metrics": metrics},
        )
    else:
        conn.execute(_END_ASSIGNMENT, {"p_assignment": assignment_id, "p_finished": now})
    if a.status == AssignmentStatus.DROPPED:  # a straggler delivered after all: no dropout
        conn.execute(
            update(Round).where(Round.id == a.round_id).values(num_dropped=Round.num_dropped - 1)
        )
        conn.execute(
            update(Device).where(Device.id == device_id).values(num_dropped=Device.num_dropped - 1)
        )
    accepted = UploadAccepted(
        update_id=update_id,
        assignment_id=assignment_id,
        task_id=ctx.task_id,
        base_version=ctx.base_version,
        staleness=tau,
        weight=weight,
        status=UpdateStatus.ACCEPTED,
        duplicate=False,
        num_examples_counted=counted,
    )
    return accepted, a.round_id


def round_may_close(conn: Connection, ctx: _Context) -> bool:
    """Whether the updates accepted so far may let the task's round close (a sync round's
    ``clients_per_round`` fresh updates on its base version; an async buffer of
    ``buffer_size``): only then does the upload ask the scheduler for a step at once. The
    scheduler's periodic tick does everything else (deadlines, counts shown in the API)."""
    cfg = ctx.config
    if cfg.mode == "async":
        pending = conn.execute(_PENDING, {"p_task": ctx.task_id}).scalar_one()
        return int(pending) >= cfg.buffer_size
    fresh = conn.execute(
        _PENDING_ON_BASE, {"p_task": ctx.task_id, "p_base": ctx.base_version}
    ).scalar_one()
    return int(fresh) >= cfg.clients_per_round


def accept_upload(
    runtime: Runtime,
    *,
    device_id: str,
    assignment_id: int,
    key: str,
    body: bytes,
    claim: RequestClaim | None = None,
) -> UploadAccepted:
    """:func:`accept_upload_ready`'s answer alone."""
    return accept_upload_ready(
        runtime, device_id=device_id, assignment_id=assignment_id, key=key, body=body, claim=claim
    )[0]


def store_body(blobs: BlobStore, body: bytes) -> tuple[str, bool]:
    """The body's digest, and whether it goes into the upload's transaction (at most the
    store's ``inline_limit``); a larger body is written to the blob store here, first."""
    inline = len(body) <= blobs.inline_limit
    return (hashlib.sha256(body).hexdigest() if inline else blobs.put(body)), inline


def record_upload(
    runtime: Runtime,
    ctx: _Context,
    claim: RequestClaim | None,
    *,
    device_id: str,
    assignment_id: int,
    key: str,
    decoded: DecodedUpdate,
    body: bytes,
    digest: str,
    inline: bool,
    also: InTransaction | None = None,
) -> tuple[UploadAccepted, int, bool]:
    """The upload's write transaction (:func:`_record_core`, a small body's rows, whether the
    round may close, then ``also``), committed: the answer, the round id and that flag."""
    with write_connection(runtime.engine) as conn:
        result, round_id = _record_core(
            conn,
            ctx,
            claim,
            device_id=device_id,
            assignment_id=assignment_id,
            key=key,
            decoded=decoded,
            digest=digest,
            size=len(body),
            now=utcnow(),
        )
        if inline:  # the bytes commit with the row, or neither does
            runtime.blobs.put_in(conn, body)
        ready = round_may_close(conn, ctx)
        if also is not None:
            also.run(conn)
    return result, round_id, ready


@dataclass
class InTransaction:
    """Work to do in the upload's own write transaction, after the upload is recorded, in a
    savepoint of its own (``then(conn)``): what it returns is kept in ``result``, and an
    exception it raises undoes only its own writes and is kept in ``error`` (the caller raises
    it once the upload has committed, as if the work had run in a transaction of its own).
    ``ran`` is False when the upload's transaction never got there (a repeat)."""

    then: Callable[[Connection], Any]
    ran: bool = False
    result: Any = None
    error: Exception | None = None

    def run(self, conn: Connection) -> None:
        self.ran = True
        try:
            with conn.begin_nested():
                self.result = self.then(conn)
        except Exception as exc:
            self.error = exc


def accept_upload_ready(
    runtime: Runtime,
    *,
    device_id: str,
    assignment_id: int,
    key: str,
    body: bytes,
    claim: RequestClaim | None = None,
    also: InTransaction | None = None,
) -> tuple[UploadAccepted, bool]:
    """Validate, store and record one upload (blocking: call from a worker thread).

    Reads and checks come first in a read-only transaction, the body is decoded and checked
    outside any transaction (and a body above the store's ``inline_limit`` written to the blob
    store), and one write transaction records it all, a small body's bytes included:
    with the request's ``claim`` (``DeviceClaimDep``) also its nonce and the device's
    ``last_seen_at``. An answer that does not come from that transaction (a repeat) records
    the claim on its own first; a refusal leaves that to ``DeviceClaimDep``.

    The flag says whether the task's round may now close (:func:`round_may_close`, read in
    the same transaction); False for a repeat. ``also`` runs last in that transaction (a
    device's next assignment, on SQLite, where every write transaction takes the one write
    lock: one commit instead of two)."""
    checked = _precheck(runtime, device_id=device_id, assignment_id=assignment_id, key=key)
    if isinstance(checked, int):
        answer = _answer_repeat(runtime, checked, assignment_id=assignment_id, key=key)
        settle_claim(runtime, claim)
        return answer, False
    ctx = checked
    try:
        decoded = decode_checked(body, ctx)
    except Unprocessable as exc:
        if exc.code == "update_norm_exceeded":
            count_norm_refusal(runtime, device_id)
        raise
    try:
        _check_staleness(ctx.config, current=ctx.current_version, base=ctx.base_version)
        digest, inline = store_body(runtime.blobs, body)
        result, result_round, ready = record_upload(
            runtime,
            ctx,
            claim,
            device_id=device_id,
            assignment_id=assignment_id,
            key=key,
            decoded=decoded,
            body=body,
            digest=digest,
            inline=inline,
            also=also,
        )
        runtime.decoded.put(digest, decoded, spec=ctx.spec, policy=ctx.policy)
        if claim is not None:
            claim.recorded = True
        publish(
            Event(
                "update.accepted",
                {
                    "task": ctx.task_id,
                    "round": result_round,
                    "device": device_id,
                    "assignment": assignment_id,
                    "update": result.update_id,
                    "bytes": len(body),
                    "staleness": result.staleness,
                },
            ),
            runtime.event_hooks,
        )
        return result, ready
    except Conflict as exc:
        if exc.code == "stale_update":
            settle_claim(runtime, claim)  # a replay must not cancel the assignment
            end_stale_assignment(runtime, device_id=device_id, assignment_id=assignment_id)
        raise
    except IntegrityError:
        # A concurrent request with the same key or for the same assignment won the race.
        with session_scope(runtime.sessions, read_only=True) as session:
            repeat = _repeat(session, device_id=device_id, key=key, assignment_id=assignment_id)
            if repeat is None:
                _check_assignment(session, device_id=device_id, assignment_id=assignment_id)
        if repeat is not None:
            settle_claim(runtime, claim)
            return repeat, False
        raise
