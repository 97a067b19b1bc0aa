"""Three stateless coordinator processes on one PostgreSQL database, a fleet of real agents
spread across them, and one process SIGKILLed and restarted during the run.

Processes ``a`` and ``b`` are single ``fedge coordinator serve`` processes, ``c`` is a
supervisor with two workers (``serve --workers 2``): four schedulers race for the task leases
(``FEDGE_LEASE_TTL_S`` 0.5 s). Each agent is enrolled with, and talks to, one of the three
addresses. A sync task and an async task run at the same time. Once the sync task has a
version, ``b`` is killed (SIGKILL, preferably while it holds a task lease) and started again
on the same port only after another process has built a version without it; ``b``'s agents
retry with backoff until their address answers again and carry on there (they do not move to
another process: an address behind a load balancer or a restarted service stays the same).

At the end the database must show: both tasks completed; every update each agent had
acknowledged stored once and no other (a retried upload is a duplicate, never a second
row); every accepted update applied in exactly one version or rejected, none left
``accepted``; versions 0..n without a gap, each built by one round from exactly its applied
updates (and equal to its base plus those updates); no assignment still active in a closed
or failed round or a finished task.

Blob store: ``FEDGE_BLOB_URL=database`` (:data:`BLOB_BACKEND`): every process has a blob
directory of its own that nobody else sees, and models and updates are rows of the one
PostgreSQL database, so the processes share nothing but the database. ``"file"`` (one shared
directory) is the other set-up :func:`blob_env` can build.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.coordinator.db import utcnow
from fedge.coordinator.models import ASSIGNMENT_ACTIVE, Lease
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.state import State
from fedge.edge_agent.transport import RetryPolicy
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support.chaos import check_invariants
from tests.support.device import make_token
from tests.support.process import CoordinatorProcess, coordinator_process
from tests.support.rounds import Db, create_task, fleet_of, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: ``"file"``: one blob directory shared by every process (the file store). ``"database"``:
#: ``FEDGE_BLOB_URL=database`` and a directory of its own per process, shared with nobody.
BLOB_BACKEND = "database"

AGENTS_PER_PROCESS = 3
SYNC_ROUNDS = 12
ASYNC_ROUNDS = 12
#: b is killed by the time the sync task has this many versions, even without a lease.
KILL_BY_VERSION = 3
SOFTMAX = {"architecture": "softmax", "input_dim": 64, "num_classes": 10, "hidden": [], "seed": 0}
COMPRESSION = {"topk_fraction": 0.1, "bits": 8, "chunk": 64, "error_feedback": True}
#: Every process: short task leases (they change hands often, and lapse soon after a kill),
#: quick ticks and long-poll re-checks, no per-device rate limit in the way.
PROCESS_ENV = {
    "FEDGE_LEASE_TTL_S": "0.5",
    "FEDGE_SCHEDULER_INTERVAL_S": "0.1",
    "FEDGE_LONG_POLL_RECHECK_S": "0.2",
    "FEDGE_DEVICE_RATE_PER_MINUTE": "100000",
}


def blob_env(backend: str, workdir: Path) -> dict[str, str]:
    """The blob store settings of one process (``workdir`` is that process's own)."""
    if backend == "file":
        return {}  # the shared FEDGE_BLOB_DIR that coordinator_process sets
    if backend == "database":
        return {"FEDGE_BLOB_URL": "database", "FEDGE_BLOB_DIR": str(workdir / "blobs")}
    raise ValueError(f"unknown blob backend {backend!r}")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test's own view of the coordinators' storage (``db`` reads blobs through it)."""
    if BLOB_BACKEND == "database":
        return settings.model_copy(update={"blob_url": "database"})
    return settings


@dataclass
class RunningAgent:
    name: str
    process: str  # a, b or c: the address it talks to
    agent: Agent
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return self.agent.state.load_config().device_id


class Processes:
    """The three coordinators, by name; ``restart`` brings one back on its port."""

    def __init__(self, stack: ExitStack, settings: Settings, ca_file: Path, root: Path) -> None:
        self.stack = stack
        self.settings = settings
        self.ca_file = ca_file
        self.root = root
        self.procs: dict[str, CoordinatorProcess] = {}
        self.starts: Counter[str] = Counter()

    def start(self, name: str, *, port: int = 0, args: tuple[str, ...] = ()) -> None:
        self.starts[name] += 1
        workdir = self.root / f"{name}{self.starts[name]}"
        env = {
            **PROCESS_ENV,
            "FEDGE_INSTANCE_ID": name,
            **blob_env(BLOB_BACKEND, self.root / name),
        }
        self.procs[name] = self.stack.enter_context(
            coordinator_process(
                self.settings, workdir, ca_file=self.ca_file, env=env, port=port, args=args
            )
        )

    def port(self, name: str) -> int:
        return int(self.procs[name].url.rsplit(":", 1)[1])

    def __getitem__(self, name: str) -> CoordinatorProcess:
        return self.procs[name]


@contextmanager
def agents_on(procs: Processes, root: Path) -> Iterator[list[RunningAgent]]:
    """``AGENTS_PER_PROCESS`` real agents enrolled with each process, running in threads;
    stopped and joined on exit."""
    data = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    running: list[RunningAgent] = []
    try:
        for index in range(3 * AGENTS_PER_PROCESS):
            process = "abc"[index % 3]
            proc = procs[process]
            token = make_token(proc)
            state_dir = root / f"agent{index}"
            enroll_device(
                state_dir, url=proc.url, token=token, ca_file=str(proc.ca_file), seed=index + 1
            )
            lo = index * 120
            X, y = data.X_train[lo : lo + 120], data.y_train[lo : lo + 120]
            local = LocalData(X[:-20], y[:-20], X[-20:], y[-20:])
            state = State(state_dir)
            stop = threading.Event()
            client = open_client(
                state,
                retry=RetryPolicy(attempts=3, base_delay=0.1, max_delay=0.5),
                sleep=stop.wait,
                interrupted=stop.is_set,
            )
            agent = Agent(
                state=state,
                client=client,
                data=local,
                seed=index + 1,
                stop_event=stop,
                poll_wait=2.0,
                error_pause_s=0.3,
            )
            entry = RunningAgent(f"agent{index}", process, agent, threading.Thread())

            def target(entry: RunningAgent = entry) -> None:
                try:
                    entry.agent.run()
                except BaseException as exc:  # reported by the test
                    entry.errors.append(exc)

            entry.thread = threading.Thread(target=target, name=entry.name, daemon=True)
            entry.thread.start()
            running.append(entry)
        yield running
    finally:
        for entry in running:
            entry.agent.stop()
        for entry in running:
            entry.thread.join(30)
            entry.agent.client.close()


def lease_holders(db: Db) -> dict[str, str]:
    return db.read(lambda s: {lease.name: lease.holder for lease in s.query(Lease)})


def orphans(db: Db, task_id: int) -> list[str]:
    """Active assignments of closed or failed rounds, or of a finished task."""
    task = db.task(task_id)
    ended = {r.id for r in db.rounds(task_id) if r.status in ("closed", "failed")}
    finished = task.status in ("completed", "cancelled", "failed")
    return [
        f"assignment {a.id} ({a.status}) of round {a.round_id}"
        for a in db.assignments(task_id)
        if a.status in ASSIGNMENT_ACTIVE and (finished or a.round_id in ended)
    ]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_three_processes_one_killed_and_restarted_every_update_applied_once(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    with ExitStack() as stack:
        procs = Processes(stack, settings, tls_paths.ca_cert, tmp_path / "coordinators")
        procs.start("a")
        procs.start("b")
        procs.start("c", args=("--workers", "2"))
        agents = stack.enter_context(agents_on(procs, tmp_path / "agents"))
        ids = [entry.device_id for entry in agents]
        # Every agent polled (and so is eligible) before the tasks start.
        wait_until(lambda: all(db.device(d).last_seen_at for d in ids), timeout=60)

        sync_task = create_task(
            procs["a"],
            model=SOFTMAX,
            compression=COMPRESSION,
            aggregation={
                "mode": "sync",
                "num_rounds": SYNC_ROUNDS,
                "clients_per_round": 4,
                "over_selection": 0.5,
                "min_updates": 3,
                "round_deadline_s": 20,
                "max_staleness": 2,
            },
        )
        async_task = create_task(
            procs["c"],
            model=SOFTMAX,
            compression=COMPRESSION,
            aggregation={
                "mode": "async",
                "num_rounds": ASYNC_ROUNDS,
                "buffer_size": 2,
                "max_concurrency": 3,
                "max_staleness": 3,
                "lease_s": 20,
            },
        )

        # Kill b once the sync task is under way, if possible while b holds a task lease.
        wait_until(lambda: db.task(sync_task).current_version >= 1, timeout=120)
        lease_names = {f"task:{sync_task}", f"task:{async_task}"}
        with suppress(AssertionError):  # b caught no lease in that time: kill it anyway
            wait_until(  # ... and early enough that most rounds are still to come
                lambda: (
                    any(lease_holders(db).get(n) == "b" for n in lease_names)
                    or db.task(sync_task).current_version >= KILL_BY_VERSION
                ),
                timeout=15,
            )
        port = procs.port("b")
        procs["b"].kill()
        killed_at = {t: db.task(t).current_version for t in (sync_task, async_task)}
        assert db.task(sync_task).status == "running", "the run ended before the kill"

        # The others carry on without b: some task gets a new version.
        wait_until(
            lambda: any(db.task(t).current_version > v for t, v in killed_at.items()),
            timeout=120,
        )
        b_agents = [entry for entry in agents if entry.process == "b"]
        before = sum(entry.agent.stats.uploaded for entry in b_agents)
        restarted = utcnow()  # b is down: whatever is seen of its agents later is its doing
        procs.start("b", port=port)  # the same address: b's agents find it again
        left = {t: db.task(t).current_version for t in (sync_task, async_task)}
        # b's agents reconnect to the restarted process and take part again.
        wait_until(
            lambda: all(
                (seen := db.device(entry.device_id).last_seen_at) and seen > restarted
                for entry in b_agents
            ),
            timeout=60,
        )
        try:
            wait_until(
                lambda: sum(entry.agent.stats.uploaded for entry in b_agents) > before,
                timeout=120,
            )
        except AssertionError as exc:
            raise AssertionError(f"b's agents uploaded nothing after the restart ({left})") from exc

        for task_id in (sync_task, async_task):
            db.wait_task(task_id, lambda t: t.status == "completed", timeout=300)
        for entry in agents:
            entry.agent.stop()
        for entry in agents:
            entry.thread.join(30)
            assert not entry.thread.is_alive(), f"{entry.name} did not stop"
            assert not entry.errors, (entry.name, entry.errors)
        for name in "abc":
            assert "Traceback" not in procs[name].log(), procs[name].log()[-3000:]

    assert db.task(sync_task).current_version == SYNC_ROUNDS
    assert db.task(async_task).current_version == ASYNC_ROUNDS
    for task_id in (sync_task, async_task):
        bad = check_invariants(
            db, task_id, model_check=expected_model, assert_close=assert_weights_equal
        )
        # Its device counters assume one task per database: checked over both tasks below.
        assert [b for b in bad if not b.startswith("device ")] == []
        assert orphans(db, task_id) == []
        updates = db.updates(task_id)
        assert all(u.status in ("applied", "rejected") for u in updates)
        applied = Counter(u.applied_version for u in updates if u.status == "applied")
        assert sorted(applied) == list(range(1, db.task(task_id).current_version + 1))
    assignments = db.assignments(sync_task) + db.assignments(async_task)
    for device_id in ids:
        device = db.device(device_id)
        statuses = Counter(a.status for a in assignments if a.device_id == device_id)
        assert (device.num_assigned, device.num_completed, device.num_dropped) == (
            statuses.total(),
            statuses["uploaded"],
            statuses["dropped"],
        ), device_id
    # Every upload an agent saw acknowledged (201, or 200 for a repeat) is one row, once.
    rows = Counter(u.device_id for task_id in (sync_task, async_task) for u in db.updates(task_id))
    assert {entry.device_id: entry.agent.stats.uploaded for entry in agents} == {
        d: rows[d] for d in ids
    }
    assert sum(rows.values()) > 0
    if BLOB_BACKEND == "database":  # no process wrote a blob file: they share only the database
        files = [p for p in (tmp_path / "coordinators").rglob("*") if p.is_file()]
        assert [p for p in files if p.parent.parent.parent.name == "blobs"] == []
        assert db.blobs.exists(updates[0].blob_digest)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_long_poll_on_one_process_learns_of_work_opened_by_another(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    """No in-process signal crosses processes: the waiting poll re-checks the database every
    ``FEDGE_LONG_POLL_RECHECK_S`` and so answers long before its ``wait`` runs out."""
    wait_s = 30
    with ExitStack() as stack:
        quiet = stack.enter_context(
            coordinator_process(
                settings,
                tmp_path / "quiet",
                ca_file=tls_paths.ca_cert,
                env={"FEDGE_SCHEDULER_ENABLED": "false", "FEDGE_LONG_POLL_RECHECK_S": "0.5"},
            )
        )
        busy = stack.enter_context(
            coordinator_process(settings, tmp_path / "busy", ca_file=tls_paths.ca_cert)
        )
        device = stack.enter_context(fleet_of(quiet, 1))[0]
        seen = db.device(device.device_id).last_seen_at
        answer: dict[str, Any] = {}

        def poll() -> None:
            started = time.monotonic()
            answer["work"] = device.work(wait=wait_s)
            answer["elapsed"] = time.monotonic() - started

        poller = threading.Thread(target=poll)
        poller.start()
        # The poll's signed request was verified (its device seen again): it is waiting.
        wait_until(lambda: db.device(device.device_id).last_seen_at != seen, timeout=30)
        task_id = create_task(
            busy,
            aggregation={
                "clients_per_round": 1,
                "min_updates": 1,
                "round_deadline_s": 600,
                "num_rounds": 1,
            },
        )
        poller.join(wait_s + 30)
        assert answer["work"] is not None, "the poll ran out instead of finding the work"
        assert answer["work"]["task_id"] == task_id
        assert answer["elapsed"] < wait_s - 5
