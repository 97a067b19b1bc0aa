"""Accepting an uploaded update (``POST /device/assignments/{id}/update``).

Order of checks (each rejection changes nothing):

1. a repeated ``Idempotency-Key`` of this device answers the first result (200);
2. the assignment exists (404) and belongs to the device (403 ``not_your_assignment``), has
   no update yet (409 ``already_uploaded``), its task is running (409 ``task_not_running``);
3. the body decodes and matches the task's spec and compression policy (400 wire codes,
   422 ``shape_mismatch``/``policy_mismatch``), its header names the assignment's task and base
   version (422 ``task_mismatch``/``base_version_mismatch``), ``num_examples >= 1`` and at
   most the task's ``max_num_examples`` (422 ``num_examples_out_of_range``), and no value's
   magnitude exceeds ``max_update_abs`` (422 ``update_out_of_range``);
4. staleness ``tau = current_version - base_version`` is within ``max_staleness``
   (409 ``stale_update``).

Then the blob is written (fsynced) and the ``Update`` row committed, in that order, before
the answer. A race between two requests with the same key or for the same assignment ends in
the unique constraints; the loser re-reads and answers like a repeat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import examples, rounds
from fedge.coordinator.engine.aggregate import max_abs
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.ownership import own_assignment
from fedge.coordinator.engine.staleness import update_weight
from fedge.coordinator.engine.taskcache import ParsedTask, TaskConfigCache
from fedge.coordinator.errors import BadRequest, Conflict, Unprocessable
from fedge.coordinator.models import Assignment, Device, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.device_work import UploadAccepted
from fedge.coordinator.states import AssignmentStatus, TaskStatus, UpdateStatus
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


def _parsed(configs: TaskConfigCache, task: Task) -> ParsedTask:
    try:
        return configs.get(task)
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
    return decoded


def _record(
    session: Session,
    configs: TaskConfigCache,
    *,
    device_id: str,
    assignment_id: int,
    key: str,
    decoded: DecodedUpdate,
    digest: str,
    size: int,
    now: datetime,
) -> UploadAccepted:
    # A repeat or a second upload for this assignment that committed since the first check
    # ends in the unique constraints (device_id, idempotency_key) and (assignment_id); the
    # caller then answers it like a repeat or a conflict.
    a, task = lock_for_upload(session, device_id=device_id, assignment_id=assignment_id)
    if task.status != TaskStatus.RUNNING:
        raise Conflict(f"task {task.id} is {task.status}, not running", code="task_not_running")
    cfg = _parsed(configs, task).config
    tau = _check_staleness(cfg, current=task.current_version, base=a.base_version)
    counted = examples.counted_examples(
        session,
        task_id=task.id,
        device_id=device_id,
        claimed=decoded.num_examples,
        cap=cfg.max_num_examples,
    )
    weight = update_weight(cfg.staleness, tau=tau, num_examples=counted, weighting=cfg.weighting)
    # Metrics carried in the update join (and override) any the device reported before.
    metrics = {**(a.metrics or {}), **decoded.metrics}
    if decoded.metrics:
        a.metrics = metrics
    u = Update(
        task_id=task.id,
        assignment_id=a.id,
        device_id=device_id,
        round_id=a.round_id,
        base_version=a.base_version,
        num_examples=decoded.num_examples,
        num_examples_counted=counted,
        blob_digest=digest,
        byte_size=size,
        staleness=tau,
        weight=weight,
        status=UpdateStatus.ACCEPTED,
        idempotency_key=key,
        received_at=now,
        metrics=metrics,
    )
    session.add(u)
    was_dropped = a.status == AssignmentStatus.DROPPED
    a.status = AssignmentStatus.UPLOADED
    a.finished_at = now
    session.flush()
    if was_dropped:  # a straggler delivered after all: it is not a dropout
        rounds.bump_round(session, a.round_id, num_dropped=-1)
    session.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(
            num_completed=Device.num_completed + 1,
            num_dropped=Device.num_dropped - (1 if was_dropped else 0),
        )
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return UploadAccepted(
        update_id=u.id,
        assignment_id=a.id,
        task_id=task.id,
        base_version=a.base_version,
        staleness=tau,
        weight=weight,
        status=UpdateStatus.ACCEPTED,
        duplicate=False,
        num_examples_counted=counted,
    )


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


def accept_upload(
    runtime: Runtime, *, device_id: str, assignment_id: int, key: str, body: bytes
) -> UploadAccepted:
    """Validate, store and record one upload (blocking: call from a worker thread)."""
    with session_scope(runtime.sessions, read_only=True) as session:
        repeat = _repeat(session, device_id=device_id, key=key, assignment_id=assignment_id)
        if repeat is not None:
            return repeat
        try:
            a, task = _check_assignment(session, device_id=device_id, assignment_id=assignment_id)
        except Conflict as exc:
            # On PostgreSQL every statement reads the latest commit: the update found here
            # may be a concurrent request's with this key, committed after the look above.
            if exc.code == "already_uploaded":
                repeat = _repeat(session, device_id=device_id, key=key, assignment_id=assignment_id)
                if repeat is not None:
                    return repeat
            raise
        parsed = _parsed(runtime.task_configs, task)
        ctx = _Context(
            task_id=task.id,
            base_version=a.base_version,
            current_version=task.current_version,
            spec=parsed.spec,
            policy=parsed.policy,
            config=parsed.config,
        )
    decoded = decode_checked(body, ctx)
    try:
        _check_staleness(ctx.config, current=ctx.current_version, base=ctx.base_version)
        blobs: BlobStore = runtime.blobs
        digest = blobs.put(body)
        with session_scope(runtime.sessions) as session:
            return _record(
                session,
                runtime.task_configs,
                device_id=device_id,
                assignment_id=assignment_id,
                key=key,
                decoded=decoded,
                digest=digest,
                size=len(body),
                now=utcnow(),
            )
    except Conflict as exc:
        if exc.code == "stale_update":
            end_stale_assignment(runtime, device_id=device_id, assignment_id=assignment_id)
        raise
    except IntegrityError:
        # A concurrent request with the same key or for the same assignment won the race.
        with session_scope(runtime.sessions, read_only=True) as session:
            repeat = _repeat(session, device_id=device_id, key=key, assignment_id=assignment_id)
            if repeat is not None:
                return repeat
            _check_assignment(session, device_id=device_id, assignment_id=assignment_id)
        raise
