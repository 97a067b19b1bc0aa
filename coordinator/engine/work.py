"""What the work long-poll (``GET /device/work``) answers; one short check per call.

- :func:`find_work`: the device's active assignment (``assigned``/``downloaded``), else, in a
  running async task whose concurrency cap allows it, a new assignment on the current version
  (a device works at most once per async round, i.e. per model version).
- :func:`require_active`: a device revoked while it waited is refused (403 ``device_revoked``)
  as soon as its poll wakes; a poll on its current assignment first reports the cancellation
  that the revocation caused.
- :func:`cancellation`: whether the assignment the device is working on was stopped
  (``cancelled``: its round closed early, the task was paused, cancelled or completed;
  ``dropped``: its round's deadline passed). Both are answered as ``status: cancelled`` so
  the device stops training at once.
- :func:`check_waiting`: the same questions for many waiting long-polls in a few queries
  (the re-checks and wake-ups of idle devices); a poll is only answered from it when the
  answer is its active assignment, anything else goes back to the poll's own check.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    Connection,
    String,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from fedge.coordinator.auth import touch_device
from fedge.coordinator.db import in_states
from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.eligibility import Requirements
from fedge.coordinator.engine.taskcache import (
    ParsedTask,
    TaskConfigCache,
    config_digest_of,
    mode_of,
    secure_of,
)
from fedge.coordinator.errors import Forbidden, NotFound
from fedge.coordinator.models import Assignment, Device, Round, Task
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ASSIGNMENT_ENDED,
    AssignmentStatus,
    DeviceStatus,
    RoundStatus,
    TaskStatus,
)

#: The parts of a work answer a device can keep between assignments of one task.
TASK_CONFIG_KEYS = ("compression", "training", "model", "spec")


def config_digest(task: Task) -> str:
    """A short digest of the task's :data:`TASK_CONFIG_KEYS` (what ``known`` refers to)."""
    return config_digest_of(task.compression, task.training, task.model_config_, task.model_spec)


def without_known_config(payload: dict[str, Any], known: str | None) -> dict[str, Any]:
    """``payload`` without the task configuration when the device already holds it."""
    if known is None or payload.get("config_digest") != known:
        return payload
    return {k: v for k, v in payload.items() if k not in TASK_CONFIG_KEYS}


class _Config(NamedTuple):
    """The task configuration a work answer carries (:data:`TASK_CONFIG_KEYS`) and its digest."""

    digest: str
    compression: Any
    training: Any
    model: Any
    spec: Any


def _payload(
    config: _Config,
    *,
    assignment_id: int,
    status: AssignmentStatus,
    task_id: int,
    round_id: int,
    mode: str,
    base_version: int,
    deadline: datetime | None,
    secure: bool = False,
) -> dict[str, Any]:
    return {
        "assignment_id": assignment_id,
        "status": status,
        "task_id": task_id,
        "round_id": round_id,
        "mode": mode,
        "base_version": base_version,
        "deadline": deadline,
        "model_url": f"{DEVICE_PREFIX}/tasks/{task_id}/models/{base_version}",
        "upload_url": f"{DEVICE_PREFIX}/assignments/{assignment_id}/update",
        "config_digest": config.digest,
        "compression": config.compression,
        "training": config.training,
        "model": config.model,
        "spec": config.spec,
        # Only for a task with secure aggregation: the device takes part in the round's
        # phases instead of uploading its update (docs/secure-aggregation.md).
        "secure_aggregation": True if secure else None,
    }


def _parsed_config(parsed: ParsedTask) -> _Config:
    """The answer's configuration from the task's cached, parsed configuration."""
    return _Config(
        parsed.config_digest,
        parsed.compression,
        parsed.training,
        parsed.model_config,
        parsed.model_spec,
    )


def task_config(task: Task) -> _Config:
    """The configuration a work answer on ``task`` carries, with its digest."""
    return _Config(
        config_digest(task), task.compression, task.training, task.model_config_, task.model_spec
    )


def assignment_payload(
    a: Assignment, task: Task, *, mode: str, config: _Config | None = None
) -> dict[str, Any]:
    """The JSON body describing one assignment (docs/protocol.md, "Work long-poll");
    ``config``: :func:`task_config` of ``task``, when the caller has it already."""
    config = task_config(task) if config is None else config
    return _payload(
        config,
        assignment_id=a.id,
        status=a.status,
        task_id=task.id,
        round_id=a.round_id,
        mode=mode,
        base_version=a.base_version,
        deadline=a.lease_expires_at,
        secure=secure_of(task.aggregation),
    )


def _mode(task: Task) -> str:
    return mode_of(task.aggregation)


_ACTIVE_OF_DEVICE = (
    select(
        Assignment.id,
        Assignment.status,
        Assignment.task_id,
        Assignment.round_id,
        Assignment.base_version,
        Assignment.lease_expires_at,
        Task.updated_at,
    )
    .join(Task, Task.id == Assignment.task_id)
    .where(
        Assignment.device_id == bindparam("p_device"),
        in_states(Assignment.status, ASSIGNMENT_ACTIVE),
    )
    .order_by(Assignment.id.desc())
    .limit(1)
)
_RUNNING_TASKS = (
    select(Task.id, Task.updated_at).where(Task.status == TaskStatus.RUNNING).order_by(Task.id)
)
# The task row locked (PostgreSQL): serializes with the scheduler and other requests for this
# task (concurrency cap). SQLite's write lock serializes them already.
_LOCK_TASK = (
    select(Task.id)
    .where(Task.id == bindparam("p_task"), Task.status == TaskStatus.RUNNING)
    .with_for_update(key_share=True)
)
_NEW_ASSIGNMENT_ROUND = (
    select(
        bindparam("p_task", type_=Assignment.__table__.c.task_id.type),
        Round.id,
        bindparam("p_device", type_=Assignment.__table__.c.device_id.type),
        Round.base_version,
        literal(AssignmentStatus.ASSIGNED.value, type_=String(16)),
        bindparam("p_lease", type_=Assignment.__table__.c.lease_expires_at.type),
        bindparam("p_now", type_=Assignment.__table__.c.assigned_at.type),
    )
    .join(Task, Task.id == Round.task_id)
    .where(
        Round.task_id == bindparam("p_task"),
        Round.status == RoundStatus.OPEN,
        Round.base_version == Task.current_version,
        Task.status == TaskStatus.RUNNING,
        # the device works at most once per async round (model version) ...
        ~exists().where(
            Assignment.round_id == Round.id, Assignment.device_id == bindparam("p_device")
        ),
        # ... on one assignment at a time ...
        ~exists().where(
            Assignment.device_id == bindparam("p_device"),
            in_states(Assignment.status, ASSIGNMENT_ACTIVE),
        ),
        # ... within the task's concurrency cap
        select(func.count(Assignment.id))
        .where(
            Assignment.task_id == bindparam("p_task"),
            in_states(Assignment.status, ASSIGNMENT_ACTIVE),
        )
        .scalar_subquery()
        < bindparam("p_cap"),
    )
    .order_by(Round.number.desc())
    .limit(1)
)
#: Whether the device already works or worked on the task's open round (its model version):
#: then no new assignment can result. Read before any lock or write: once true it stays true
#: for that round, so the answer is what the assignment's own checks would find at this
#: statement's moment.
_WORKED_ON_OPEN_ROUND = (
    select(Assignment.id)
    .join(Round, Round.id == Assignment.round_id)
    .join(Task, Task.id == Round.task_id)
    .where(
        Assignment.device_id == bindparam("p_device"),
        Round.task_id == bindparam("p_task"),
        Round.status == RoundStatus.OPEN,
        Round.base_version == Task.current_version,
    )
    .limit(1)
)
#: One statement decides and inserts a new async assignment (INSERT ... SELECT ... RETURNING).
_INSERT_ASYNC = (
    insert(Assignment)
    .from_select(
        [
            Assignment.task_id,
            Assignment.round_id,
            Assignment.device_id,
            Assignment.base_version,
            Assignment.status,
            Assignment.lease_expires_at,
            Assignment.assigned_at,
        ],
        _NEW_ASSIGNMENT_ROUND,
    )
    .returning(Assignment.id, Assignment.round_id, Assignment.base_version)
)
_COUNT_ASSIGNED = (
    update(Round)
    .where(Round.id == bindparam("p_round"))
    .values(num_assigned=Round.num_assigned + 1)
)
_DEVICE_ASSIGNED = (
    update(Device)
    .where(Device.id == bindparam("p_device"))
    .values(num_assigned=Device.num_assigned + 1)
)
_DEVICE_NOT_ASSIGNED = (
    update(Device)
    .where(Device.id == bindparam("p_device"))
    .values(num_assigned=Device.num_assigned - 1)
)


#: What eligibility needs of a device (fedge.coordinator.engine.eligibility).
_TARGETING = select(Device.tags, Device.capabilities).where(Device.id == bindparam("p_device"))
#: Whether the device declined the task since its last capability report (it would again).
_DECLINED = (
    select(Assignment.id)
    .join(Device, Device.id == Assignment.device_id)
    .where(
        Assignment.device_id == bindparam("p_device"),
        Assignment.task_id == bindparam("p_task"),
        Assignment.decline_reason.is_not(None),
        or_(Device.capabilities_at.is_(None), Assignment.finished_at >= Device.capabilities_at),
    )
    .limit(1)
)


def find_work(
    conn: Connection,
    configs: TaskConfigCache,
    *,
    device_id: str,
    now: datetime,
    seen: bool = False,
) -> dict[str, Any] | None:
    """The assignment the device should work on now, or ``None`` (SQLAlchemy Core, in the
    caller's write transaction). ``seen``: also set the device's ``last_seen_at`` (and
    re-check that it is active, :func:`fedge.coordinator.auth.touch_device`) as the last
    statement, where the lock order puts the device row."""
    active = conn.execute(_ACTIVE_OF_DEVICE, {"p_device": device_id}).first()
    if active is not None:
        aid, status, task_id, round_id, base_version, lease, updated_at = active
        parsed = configs.lookup(conn, task_id, updated_at)
        if seen:
            touch_device(conn, device_id, now=now)
        return _payload(
            _parsed_config(parsed),
            assignment_id=aid,
            status=status,
            task_id=task_id,
            round_id=round_id,
            mode=parsed.mode,
            base_version=base_version,
            deadline=lease,
            secure=parsed.config is not None and parsed.config.secure is not None,
        )
    targeting: tuple[Any, Any] | None = None
    for candidate_id, updated_at in conn.execute(_RUNNING_TASKS).all():
        parsed = configs.lookup(conn, candidate_id, updated_at)
        cfg = parsed.config
        if parsed.mode != "async" or cfg is None:
            continue
        if not parsed.requirements.empty:
            if targeting is None:
                targeting = conn.execute(_TARGETING, {"p_device": device_id}).first()
            if (
                targeting is None
                or parsed.requirements.unmet(targeting[0], targeting[1]) is not None
            ):
                continue
        if conn.execute(_DECLINED, {"p_device": device_id, "p_task": candidate_id}).first():
            continue
        found = _assign_async(
            conn, parsed, cfg, candidate_id, device_id=device_id, now=now, seen=seen
        )
        if found is not None:
            return found
    if seen:
        touch_device(conn, device_id, now=now)
    return None


def _assign_async(
    conn: Connection,
    parsed: ParsedTask,
    cfg: AggregationConfig,
    task_id: int,
    *,
    device_id: str,
    now: datetime,
    seen: bool,
) -> dict[str, Any] | None:
    """A new async assignment for an idle device, unless the concurrency cap is reached or
    the device already worked on this round's version (or holds an active assignment).

    Few statements run under the task's lock, since every work request of the task queues
    on it: the device row (``last_seen_at`` with ``seen``, and ``num_assigned`` counted
    ahead: taken back when no assignment results), then one ``INSERT ... SELECT`` that
    checks the round, the device's history and busyness and the cap and inserts, then the
    round's counter. The device row is locked before the checks read the device's
    assignments, so two processes cannot both give it work (on PostgreSQL each statement
    reads the latest commit; SQLite serializes writers).

    A device that already worked on the open round (the common case right after its upload,
    until the version moves) is answered by one read first, without the task's lock and
    without writing the device row twice."""
    if conn.execute(_WORKED_ON_OPEN_ROUND, {"p_task": task_id, "p_device": device_id}).first():
        return None  # with ``seen``, find_work touches the device row at its end
    if (
        conn.dialect.name == "postgresql"
        and conn.execute(_LOCK_TASK, {"p_task": task_id}).first() is None
    ):
        return None
    if seen:
        touch_device(conn, device_id, now=now, count="num_assigned")
    else:
        conn.execute(_DEVICE_ASSIGNED, {"p_device": device_id})
    lease = now + timedelta(seconds=cfg.lease_s)
    row = conn.execute(
        _INSERT_ASYNC,
        {
            "p_task": task_id,
            "p_device": device_id,
            "p_lease": lease,
            "p_now": now,
            "p_cap": cfg.max_concurrency,
        },
    ).first()
    if row is None:
        conn.execute(_DEVICE_NOT_ASSIGNED, {"p_device": device_id})
        return None
    aid, round_id, base_version = row
    conn.execute(_COUNT_ASSIGNED, {"p_round": round_id})
    return _payload(
        _parsed_config(parsed),
        assignment_id=aid,
        status=AssignmentStatus.ASSIGNED,
        task_id=task_id,
        round_id=round_id,
        mode="async",
        base_version=base_version,
        deadline=lease,
    )


def require_active(conn: Connection, device_id: str) -> None:
    """A device revoked while its long-poll waited gets no more work (403 at once)."""
    status = conn.execute(_STATUS, {"p_device": device_id}).scalar()
    if status != DeviceStatus.ACTIVE:
        raise Forbidden(f"device {device_id} has been revoked", code="device_revoked")


_ASSIGNMENT_OWNER = select(
    Assignment.device_id,
    Assignment.status,
    Assignment.task_id,
    Assignment.round_id,
    Assignment.base_version,
).where(Assignment.id == bindparam("p_assignment"))
_STATUS = select(Device.status).where(Device.id == bindparam("p_device"))


def cancellation(conn: Connection, *, device_id: str, assignment_id: int) -> dict[str, Any] | None:
    """A ``status: cancelled`` body when the device's assignment was stopped, else ``None``
    (404 / 403 ``not_your_assignment`` as :func:`~fedge.coordinator.engine.ownership.
    own_assignment`)."""
    row = conn.execute(_ASSIGNMENT_OWNER, {"p_assignment": assignment_id}).first()
    if row is None:
        raise NotFound(f"no assignment {assignment_id}")
    owner, status, task_id, round_id, base_version = row
    if owner != device_id:
        raise Forbidden(
            f"assignment {assignment_id} belongs to another device", code="not_your_assignment"
        )
    if status not in ASSIGNMENT_ENDED:
        return None
    return {
        "assignment_id": assignment_id,
        "status": AssignmentStatus.CANCELLED,
        "reason": "deadline passed"
        if status == AssignmentStatus.DROPPED
        else "stopped by the coordinator",
        "task_id": task_id,
        "round_id": round_id,
        "base_version": base_version,
    }


#: What :func:`check_waiting` says about one waiting poll: ``found`` (the payload is the
#: answer), ``none`` (nothing new: keep waiting) or ``check`` (run the poll's own check).
Verdict = tuple[Literal["found", "none", "check"], dict[str, Any] | None]
#: Ids per ``IN (...)`` list of :func:`check_waiting`.
CHECK_CHUNK = 500


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + CHECK_CHUNK] for i in range(0, len(items), CHECK_CHUNK)]


def _async_work_rounds(session: Session) -> list[tuple[int, Requirements]]:
    """Open rounds of running async tasks that may hand out an assignment now (as
    :func:`find_work` sees them: a task whose configuration cannot be read hands out none),
    with their task's requirements."""
    open_rounds: list[tuple[int, Requirements]] = []
    for task_id, aggregation, version, requirements in session.execute(
        select(Task.id, Task.aggregation, Task.current_version, Task.requirements).where(
            Task.status == TaskStatus.RUNNING
        )
    ):
        if mode_of(aggregation) != "async":
            continue
        try:
            cfg = AggregationConfig.from_dict(aggregation)
        except ConfigError:
            continue
        rnd = rounds.active_round(session, task_id)
        if rnd is None or rnd.status != RoundStatus.OPEN or rnd.base_version != version:
            continue
        active = session.scalar(
            select(func.count(Assignment.id)).where(
                Assignment.task_id == task_id, in_states(Assignment.status, ASSIGNMENT_ACTIVE)
            )
        )
        if int(active or 0) < cfg.max_concurrency:
            open_rounds.append((rnd.id, Requirements.from_stored(requirements)))
    return open_rounds


def check_waiting(session: Session, polls: Sequence[tuple[str, int | None]]) -> list[Verdict]:
    """One verdict per waiting poll ``(device_id, current)``, in order, from a few queries.

    ``found`` is given only for a poll without ``current`` of an active device that has an
    active assignment: exactly what :func:`find_work` would answer. ``check`` whenever the
    poll's own check may answer something else (revoked or unknown device, its current
    assignment stopped or not its own, async work possibly available to it); ``none`` when
    it would answer nothing.
    """
    device_ids = sorted({d for d, _ in polls})
    status: dict[str, DeviceStatus] = {}
    for part in _chunks(device_ids):
        rows = session.execute(select(Device.id, Device.status).where(Device.id.in_(part)))
        status.update({device_id: st for device_id, st in rows})  # not a Result: it has keys()
    currents = sorted({c for _, c in polls if c is not None})
    owners: dict[int, tuple[str, AssignmentStatus]] = {}
    for part in _chunks(currents):
        for aid, owner_id, st in session.execute(
            select(Assignment.id, Assignment.device_id, Assignment.status).where(
                Assignment.id.in_(part)
            )
        ):
            owners[aid] = (owner_id, st)
    idle = sorted({d for d, c in polls if c is None and status.get(d) == DeviceStatus.ACTIVE})
    latest: dict[str, Assignment] = {}
    for part in _chunks(idle):
        for a in session.scalars(
            select(Assignment)
            .where(Assignment.device_id.in_(part), in_states(Assignment.status, ASSIGNMENT_ACTIVE))
            .order_by(Assignment.id.desc())
        ):
            latest.setdefault(a.device_id, a)
    tasks = (
        {
            t.id: t
            for t in session.scalars(
                select(Task).where(Task.id.in_({a.task_id for a in latest.values()}))
            )
        }
        if latest
        else {}
    )
    # One digest per task, not per answer (it serializes the whole configuration).
    configs = {task_id: task_config(t) for task_id, t in tasks.items()}
    waiting = [d for d in idle if d not in latest]
    may_get_work: set[str] = set()
    if waiting:
        open_rounds = _async_work_rounds(session)
        if open_rounds:
            done: dict[int, set[str]] = {r: set() for r, _ in open_rounds}
            round_ids = [r for r, _ in open_rounds]
            for part in _chunks(waiting):
                for rid, did in session.execute(
                    select(Assignment.round_id, Assignment.device_id).where(
                        Assignment.round_id.in_(round_ids), Assignment.device_id.in_(part)
                    )
                ):
                    done[rid].add(did)
            targeting: dict[str, tuple[Any, Any]] = {}
            if any(not req.empty for _, req in open_rounds):
                for part in _chunks(waiting):
                    for did, tags, caps in session.execute(
                        select(Device.id, Device.tags, Device.capabilities).where(
                            Device.id.in_(part)
                        )
                    ):
                        targeting[did] = (tags, caps)
            may_get_work = {
                d
                for d in waiting
                if any(
                    d not in done[r]
                    and (req.empty or req.unmet(*targeting.get(d, (None, None))) is None)
                    for r, req in open_rounds
                )
            }
    verdicts: list[Verdict] = []
    for device_id, current in polls:
        if status.get(device_id) != DeviceStatus.ACTIVE:
            verdicts.append(("check", None))
        elif current is not None:
            owner = owners.get(current)
            stopped = owner is None or owner[0] != device_id or owner[1] in ASSIGNMENT_ENDED
            verdicts.append(("check", None) if stopped else ("none", None))
        elif device_id in latest:
            a = latest[device_id]
            task = tasks.get(a.task_id)
            if task is None:
                verdicts.append(("check", None))
            else:
                payload = assignment_payload(a, task, mode=_mode(task), config=configs[a.task_id])
                verdicts.append(("found", payload))
        elif device_id in may_get_work:
            verdicts.append(("check", None))
        else:
            verdicts.append(("none", None))
    return verdicts
