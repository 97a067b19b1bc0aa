"""The scheduler: a loop in the coordinator's lifespan that moves every task's rounds forward.

Everything it decides comes from the database, so a restarted coordinator resumes where the
last one stopped (an ``aggregating`` round is aggregated again, an expired round is closed).

Each tick lists the tasks that need attention (in a thread, never blocking the event loop)
and hands each one that is not already being stepped to a bounded pool of
``settings.scheduler_workers`` threads: tasks are stepped independently, so a long
aggregation of one task does not hold back another task's deadlines, cancellations and round
openings, and a task is stepped by at most one thread of the process at a time.

A step takes the task's lease (``leases``: one coordinator process acts for a task at a
time; the lease lapses after ``settings.lease_ttl_s`` if its holder dies) and keeps it
renewed while it runs (:class:`~fedge.coordinator.engine.leases.LeaseKeeper`), then:

1. in one short transaction (task row locked on PostgreSQL), applies the state rules of
   :mod:`fedge.coordinator.engine.rounds`: open, close or fail rounds, replace the
   devices a paced round picked that did not come, drop expired async
   assignments, wind down paused, cancelled and finished tasks;
2. if a round is ready to aggregate, plans, computes and commits it
   (:mod:`fedge.coordinator.engine.apply`).

Devices affected (newly assigned, cancelled) are woken through the :class:`Notifier` after
each step; a new version of an async task wakes every waiting poll of the process (any idle
device may get work on it now; polls in other processes see it at their next re-check).
An upload that may let its round close (:func:`~fedge.coordinator.engine.updates.
round_may_close`) calls :meth:`Scheduler.kick` so the round closes without waiting for the
next tick (a task kicked while its step runs is stepped again as soon as that step ends);
other uploads leave the task to the periodic tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import Connection, exists, or_, select, update
from sqlalchemy.orm import Session

from fedge.coordinator.db import READ_ONLY, in_states, session_scope, utcnow
from fedge.coordinator.engine import apply, leases, rounds, secure
from fedge.coordinator.engine.aggregate import BadStoredUpdate
from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.evalhook import EvalHook, load_hook
from fedge.coordinator.engine.idlestep import idle_async_step
from fedge.coordinator.engine.notify import Notifier
from fedge.coordinator.engine.pace import liveness_for
from fedge.coordinator.events import Event, emit, publish
from fedge.coordinator.models import Assignment, Round, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.states import (
    ASSIGNMENT_ACTIVE,
    ROUND_ACTIVE,
    TASK_LIVE,
    TASK_TERMINAL,
    RoundStatus,
    TaskStatus,
    UpdateStatus,
)

log = logging.getLogger(__name__)


@dataclass
class StepOutcome:
    """What one task step did: devices to wake and whether a version was committed."""

    woken: list[str] = field(default_factory=list)
    aggregated: bool = False
    #: An async task committed a version: every idle device may have work now.
    wake_idle: bool = False


#: Running and paused tasks, and stopped tasks with leftovers to wind down (built once: the
#: scheduler asks several times a second).
_NEEDING_ATTENTION = (
    select(Task.id)
    .where(
        or_(
            in_states(Task.status, TASK_LIVE),
            in_states(Task.status, TASK_TERMINAL)
            & or_(
                exists().where(
                    Assignment.task_id == Task.id, in_states(Assignment.status, ASSIGNMENT_ACTIVE)
                ),
                exists().where(Round.task_id == Task.id, in_states(Round.status, ROUND_ACTIVE)),
                exists().where(Update.task_id == Task.id, Update.status == UpdateStatus.ACCEPTED),
            ),
        )
    )
    .order_by(Task.id)
)


def tasks_needing_attention(conn: Connection | Session) -> list[int]:
    """Running and paused tasks, and stopped tasks with leftovers to wind down."""
    return [int(task_id) for task_id in conn.execute(_NEEDING_ATTENTION).scalars()]


def lock_task(session: Session, task_id: int) -> Task | None:
    """The task row, locked for this transaction (``FOR NO KEY UPDATE`` on PostgreSQL;
    SQLite's write lock already serializes writers). Every engine transaction that moves a
    task's rounds or updates starts here, so they run one after another per task."""
    return session.scalar(
        select(Task)
        .where(Task.id == task_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )


class TaskStepper:
    """The per-task work of one tick (blocking; used by the scheduler and by tests)."""

    def __init__(self, runtime: Runtime, *, hook: EvalHook | None = None) -> None:
        self.runtime = runtime
        self.hook = hook
        self.keeper = leases.LeaseKeeper(
            runtime.sessions, holder=self.holder, ttl_s=runtime.settings.lease_ttl_s
        )
        #: Set at shutdown: steps running then start no further aggregation.
        self.stopping = threading.Event()
        self._busy: set[int] = set()
        self._busy_lock = threading.Lock()
        #: Task -> ``time.monotonic()`` of this process's last successful acquisition of its
        #: lease: a step within ``ttl / 3`` of it needs no write to know the lease is ours
        #: (nobody can take an unexpired lease), so a busy task's steps do not each commit.
        self._acquired_at: dict[int, float] = {}
        #: Tasks a full step found running in async mode: only their steps try
        #: :func:`fedge.coordinator.engine.idlestep.idle_async_step` first.
        self._async_tasks: set[int] = set()

    @property
    def holder(self) -> str:
        return self.runtime.settings.instance_id

    def task_ids(self) -> list[int]:
        """The tasks that need attention now."""
        with self.runtime.engine.connect() as conn:
            try:
                return tasks_needing_attention(conn.execution_options(**READ_ONLY))
            finally:
                conn.rollback()

    def tick(self) -> list[str]:
        """One pass over every task that needs attention, one after another; the devices to
        wake (the :class:`Scheduler` steps tasks in parallel instead)."""
        task_ids = self.task_ids()
        woken: list[str] = []
        for task_id in task_ids:
            try:
                woken.extend(self.step(task_id).woken)
            except Exception:
                log.exception("scheduler step for task %s failed; retrying next tick", task_id)
        return woken

    def step(self, task_id: int) -> StepOutcome:
        """Advance one task as far as it can go now (if this process holds its lease).

        Does nothing when another thread of this process is stepping the task already."""
        outcome = StepOutcome()
        with self._busy_lock:
            if task_id in self._busy:
                return outcome
            self._busy.add(task_id)
        try:
            name = leases.task_lease_name(task_id)
            if not self._holds_lease(task_id, name):
                return outcome
            with self.keeper.hold(name) as held:
                ready = self._transitions(task_id, outcome)
                if ready:
                    self._aggregate(task_id, outcome, held)
            if held.lost:
                self._acquired_at.pop(task_id, None)
            return outcome
        finally:
            with self._busy_lock:
                self._busy.discard(task_id)

    def _holds_lease(self, task_id: int, name: str) -> bool:
        """Take or renew the task's lease, unless this process took it less than a third of
        its TTL ago (then it is still ours for at least two thirds of the TTL)."""
        ttl_s = self.runtime.settings.lease_ttl_s
        started = time.monotonic()
        if started - self._acquired_at.get(task_id, -ttl_s) < ttl_s / 3:
            return True
        with session_scope(self.runtime.sessions) as session:
            acquired = leases.acquire(session, name, holder=self.holder, ttl_s=ttl_s, now=utcnow())
        if acquired:
            self._acquired_at[task_id] = started
        else:
            self._acquired_at.pop(task_id, None)
        return acquired

    def _transitions(self, task_id: int, outcome: StepOutcome) -> bool:
        """Step 1; True when a round is ready to aggregate."""
        now = utcnow()
        # An async task (its mode never changes once it runs) may have nothing else to write.
        if task_id in self._async_tasks and idle_async_step(self.runtime, task_id, now=now):
            return False
        # Read before the task's lock: a fresh reading takes a pooled connection, and one
        # taken while this step holds another (and the task row that the requests holding
        # the rest of the pool wait for) would wait for the pool's timeout.
        liveness = liveness_for(self.runtime)
        with session_scope(self.runtime.sessions) as session:
            task = lock_task(session, task_id)
            if task is None:
                return False
            if task.status in TASK_TERMINAL:
                outcome.woken += rounds.wind_down(
                    session, task, now=now, reason=f"task {task.status}"
                )
                return False
            if task.status == TaskStatus.PAUSED:
                outcome.woken += rounds.pause_effects(session, task, now=now)
                rnd = rounds.active_round(session, task.id)
                return rnd is not None and rnd.status == RoundStatus.AGGREGATING
            if task.status != TaskStatus.RUNNING:
                return False
            try:
                cfg = AggregationConfig.from_dict(task.aggregation)
            except ConfigError as exc:
                task.status = TaskStatus.FAILED
                task.status_reason = f"invalid aggregation config: {exc}"
                emit(session, "task.failed", task=task.id, reason=task.status_reason)
                task.finished_at = task.updated_at = now
                outcome.woken += rounds.wind_down(session, task, now=now, reason="task failed")
                return False
            if task.current_version < 0:
                return False
            if task.current_version >= cfg.num_rounds:
                outcome.woken += rounds.finish_task(
                    session, task, now=now, reason=f"{cfg.num_rounds} aggregations done"
                )
                return False
            if cfg.mode == "async":
                self._async_tasks.add(task_id)
                return self._async_transitions(session, task, cfg, outcome, liveness)
            rnd = rounds.active_round(session, task.id)
            if rnd is not None and rnd.status == RoundStatus.OPEN and cfg.secure is not None:
                outcome.woken += secure.advance(session, task, rnd, cfg, now=now)
            elif rnd is not None and rnd.status == RoundStatus.OPEN:
                outcome.woken += rounds.close_sync_round_if_due(session, task, rnd, cfg, now=now)
                outcome.woken += rounds.settle_declines(
                    session, task, rnd, cfg, now=now, liveness=liveness
                )
                outcome.woken += rounds.replace_missed(
                    session, task, rnd, cfg, now=now, liveness=liveness
                )
            if rnd is None or rnd.status == RoundStatus.FAILED:
                rnd, assigned = rounds.open_sync_round(
                    session, task, cfg, now=now, liveness=liveness
                )
                outcome.woken += assigned
            return rnd is not None and rnd.status == RoundStatus.AGGREGATING

    def _async_transitions(
        self,
        session: Session,
        task: Task,
        cfg: AggregationConfig,
        outcome: StepOutcome,
        liveness: Liveness,
    ) -> bool:
        now = utcnow()
        outcome.woken += rounds.expire_async_leases(session, task, now=now)
        outcome.woken += rounds.cancel_doomed(session, task, cfg, now=now)
        rnd = rounds.active_round(session, task.id)
        if rnd is None:
            rnd = rounds.open_async_round(session, task, cfg, now=now)
        pending = rounds.count_pending(session, task.id)
        if pending < cfg.buffer_size:
            rounds.explain_async_wait(session, task, now=now, liveness=liveness)
        if rnd.num_received != min(pending, cfg.buffer_size):
            rnd.num_received = min(pending, cfg.buffer_size)
        return pending >= cfg.buffer_size

    def _aggregate(
        self, task_id: int, outcome: StepOutcome, held: leases.Hold | None = None
    ) -> None:
        """Step 2: plan, compute and commit one aggregation (repeated while async buffers
        are full). No aggregation starts once the process is stopping or the task's lease
        was lost (the next tick, or the lease's new holder, takes it up)."""
        for _ in range(100):
            if self.stopping.is_set() or (held is not None and held.lost):
                return
            with session_scope(self.runtime.sessions) as session:
                # The plan reads the round and may fail it or reject updates: it runs under
                # the task row lock like every other writer of the task's rounds, so it sees
                # (and cannot overwrite) an aggregation another process just committed.
                task = lock_task(session, task_id)
                rnd = None if task is None else rounds.active_round(session, task_id)
                if task is None or rnd is None:
                    return
                cfg = AggregationConfig.from_dict(task.aggregation)
                if cfg.mode == "sync" and rnd.status != RoundStatus.AGGREGATING:
                    return
                plan = apply.plan_aggregation(session, task, rnd, cfg)
                if plan is None and cfg.mode == "sync":
                    rounds.fail_round(
                        session, rnd, reason="no updates left to aggregate", now=utcnow()
                    )
            if plan is None:
                return
            started = time.perf_counter()
            try:
                result = apply.compute(
                    plan, self.runtime.blobs, hook=self.hook, decoded=self.runtime.decoded
                )
            except BadStoredUpdate as exc:
                self._reject_unreadable(plan.items[exc.index].update_id, exc.detail)
                continue
            except apply.AggregationFailed as exc:
                self._fail_aggregation(plan, exc.reason)
                return
            publish(
                Event(
                    "aggregation.computed",
                    {
                        "task": plan.task_id,
                        "round": plan.round_id,
                        "updates": len(plan.items),
                        "seconds": round(time.perf_counter() - started, 6),
                    },
                ),
                self.runtime.event_hooks,
            )
            liveness = liveness_for(self.runtime)  # before the session (see _transitions)
            try:
                with session_scope(self.runtime.sessions) as session:
                    woken = apply.commit_aggregation(
                        session, plan, result, now=utcnow(), liveness=liveness
                    )
            except apply.RoundMoved:
                woken = None
            if woken is None:
                log.info("aggregation of task %s discarded: state moved meanwhile", task_id)
                return
            outcome.aggregated = True
            outcome.woken += woken
            if cfg.mode == "sync":
                return
            outcome.wake_idle = True

    def _reject_unreadable(self, update_id: int, detail: str) -> None:
        log.error("update %s cannot be aggregated (%s); rejecting it", update_id, detail)
        with session_scope(self.runtime.sessions) as session:
            session.execute(
                update(Update)
                .where(Update.id == update_id, Update.status == UpdateStatus.ACCEPTED)
                .values(
                    status=UpdateStatus.REJECTED,
                    reason=f"stored update unreadable at aggregation: {detail}",
                )
                .execution_options(synchronize_session=False)
            )

    def _fail_aggregation(self, plan: apply.Plan, reason: str) -> None:
        """Fail the planned round and reject its updates, in one transaction, so the same
        aggregation is not computed again; the next round opens as usual on the next tick.
        Nothing changes when the round is no longer active (another attempt settled it)."""
        log.error(
            "aggregation of task %s round %s failed (%s); failing the round",
            plan.task_id,
            plan.round_id,
            reason,
        )
        reason = f"aggregation failed: {reason}"
        now = utcnow()
        with session_scope(self.runtime.sessions) as session:
            lock_task(session, plan.task_id)
            rnd = session.get(Round, plan.round_id)
            if rnd is None or not rounds.fail_round(session, rnd, reason=reason, now=now):
                return
            ids = [i.update_id for i in plan.items]
            rejected = 0
            for start in range(0, len(ids), apply.IN_BATCH):
                done = session.execute(
                    update(Update)
                    .where(
                        Update.id.in_(ids[start : start + apply.IN_BATCH]),
                        Update.status == UpdateStatus.ACCEPTED,
                    )
                    .values(status=UpdateStatus.REJECTED, reason=reason)
                    .execution_options(synchronize_session=False)
                )
                rejected += done.rowcount  # type: ignore[attr-defined]
            rounds.bump_round(session, plan.round_id, num_rejected=rejected)

    def release_leases(self) -> None:
        self._acquired_at.clear()
        with session_scope(self.runtime.sessions) as session:
            leases.release_all(session, holder=self.holder)


class Scheduler:
    """Steps every task that needs attention, each in a thread of a bounded pool, every
    ``settings.scheduler_interval_s`` (or sooner when kicked) until stopped."""

    def __init__(self, runtime: Runtime, notifier: Notifier) -> None:
        self.runtime = runtime
        self.notifier = notifier
        self.stepper = TaskStepper(runtime, hook=load_hook(runtime.settings.eval_hook))
        self.workers = runtime.settings.scheduler_workers
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fedge-step")
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        #: Steps in flight, by task (at most one per task).
        self._running: dict[int, asyncio.Future[StepOutcome]] = {}
        #: Loop time each task's last step started: the longest-waiting tasks go first when
        #: there are more tasks to step than free workers.
        self._last_started: dict[int, float] = {}
        self._backlog = False
        self._waiting = 0
        self._kicks = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fedge-scheduler")

    def kick(self) -> None:
        """Run the next tick now (call on the event loop)."""
        self._kicks += 1
        self._wake.set()

    @property
    def running(self) -> set[int]:
        """The tasks being stepped right now."""
        return set(self._running)

    async def _run(self) -> None:
        interval = self.runtime.settings.scheduler_interval_s
        while not self._stopping:
            self._wake.clear()
            try:
                task_ids = await asyncio.to_thread(self.stepper.task_ids)
                if not self._stopping:
                    self._launch(task_ids)
            except Exception:
                log.exception("scheduler tick failed; retrying")
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    def _launch(self, task_ids: list[int]) -> None:
        loop = asyncio.get_running_loop()
        self._last_started = {t: self._last_started.get(t, -1.0) for t in task_ids}
        waiting = sorted(
            (t for t in task_ids if t not in self._running), key=self._last_started.__getitem__
        )
        free = self.workers - len(self._running)
        self._backlog = len(waiting) > free
        for task_id in waiting[: max(free, 0)]:
            self._last_started[task_id] = loop.time()
            future = loop.run_in_executor(self._pool, self.stepper.step, task_id)
            self._running[task_id] = future
            future.add_done_callback(partial(self._step_done, task_id, self._kicks))
        self._waiting = max(0, len(waiting) - max(free, 0))
        self._report()

    def _report(self) -> None:
        metrics = self.runtime.metrics
        if metrics is not None:
            metrics.steps_running.set(len(self._running))
            metrics.tasks_waiting.set(self._waiting)

    def _step_done(self, task_id: int, kicks: int, future: asyncio.Future[StepOutcome]) -> None:
        self._running.pop(task_id, None)
        self._report()
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.error(
                "scheduler step for task %s failed; retrying next tick", task_id, exc_info=exc
            )
        else:
            outcome = future.result()
            self.notifier.notify(outcome.woken)
            if outcome.wake_idle:
                self.notifier.notify_all()
        # A kick that came while the step ran may be for this task (an upload that completed
        # its round); tasks left waiting for a worker can have this one.
        if not self._stopping and (kicks != self._kicks or self._backlog):
            self._wake.set()

    async def stop(self) -> None:
        """Stop ticking, let the steps in flight end (none starts another aggregation), stop
        renewing and hand this process's leases back."""
        self._stopping = True
        self.stepper.stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._running:
            await asyncio.wait(list(self._running.values()))
        await asyncio.to_thread(self._pool.shutdown)
        try:
            await asyncio.to_thread(self.stepper.keeper.close)
            await asyncio.to_thread(self.stepper.release_leases)
        except Exception:
            log.exception("could not release scheduler leases at shutdown")
