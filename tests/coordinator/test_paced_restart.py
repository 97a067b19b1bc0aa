"""A paced sync round open across a coordinator stop and restart (docs/rounds.md, "Paced
fleets"; docs/agent.md, "Outages"): the devices that hold work for it retry within its
deadline, a picked device that missed its check-in during the outage is replaced, and an idle
device whose check-in failed still pauses a random part of its pacing interval."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from fedge.coordinator.app import create_app
from fedge.coordinator.db import session_scope
from fedge.coordinator.engine import pace, rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.models import Device, Round, Task
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.edge_agent.agent import Agent, WorkRetry, paced_retry_s
from fedge.edge_agent.client import CoordinatorClient
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.errors import AgentError
from fedge.edge_agent.outbox import OutboxEntry
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.state import State
from fedge.edge_agent.transport import RetryPolicy
from tests.coordinator.conftest import Coordinator, make_key
from tests.support.device import make_token
from tests.support.rounds import Db, create_task, fleet_of, wait_until
from tests.support.servers import free_port, serve_in_thread

# A window of 3 s: 4 devices and a demand of 3 make a period of 4 * 3 / (3 * 3) = 1.3 s, so
# the idle devices check in every second or two.
PACED = {"pace_min_fleet": 1, "pace_max_s": 600.0, "pace_min_s": 1.0, "pace_window_s": 3.0}
#: A device that holds work: quick retries, never longer than this.
WORK_RETRY = WorkRetry(attempts=8, base_s=0.2, cap_s=1.0)
#: The idle pause's lower end: far longer than any retry of a device that holds work.
ERROR_PAUSE_S = 20.0
SEED = 3


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update=PACED)


@pytest.fixture(autouse=True)
def _fresh_pace_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request reads the fleet size and the demand again (not once per 15 s).
    monkeypatch.setattr(pace, "REFRESH_S", 0.0)
    # The test's devices come within a second of their slots (real ones: within a few).
    monkeypatch.setattr(rounds, "MISSED_GRACE_S", 4.0)


@contextmanager
def _serving(settings: Settings, tls_paths: TlsPaths, port: int) -> Iterator[Coordinator]:
    app: FastAPI = create_app(settings)
    with serve_in_thread(
        app, certfile=settings.tls_cert, keyfile=settings.tls_key, port=port
    ) as url:
        yield Coordinator(
            url,
            settings,
            app,
            tls_paths.ca_cert,
            make_key(settings, "admin"),
            make_key(settings, "viewer"),
        )


class _Device:
    """An enrolled agent run in a thread, its pauses recorded."""

    def __init__(self, state_dir: Path, data: LocalData, *, hold: threading.Event | None) -> None:
        self.state = State(state_dir)
        self.client: CoordinatorClient = open_client(
            self.state, retry=RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
        )
        self.reached_upload = threading.Event()
        self.paused = threading.Event()
        self.pauses: list[tuple[bool, float]] = []  # (held work, seconds)
        self.errors: list[BaseException] = []
        self._hold = hold
        self.agent = Agent(
            state=self.state,
            client=self.client,
            data=data,
            seed=SEED,
            poll_wait=1.0,
            error_pause_s=ERROR_PAUSE_S,
            work_retry=WORK_RETRY,
            report_capabilities=False,
            before_upload=self._before_upload,
        )
        pause, after_failure = self.agent._pause, self.agent._pause_after_failure
        failing = threading.local()

        def failed(exc: AgentError) -> None:
            failing.now = True
            try:
                after_failure(exc)
            finally:
                failing.now = False

        def recorded(seconds: float) -> None:
            if getattr(failing, "now", False):  # not a sleep until a reconnect time
                self.pauses.append((self.agent.held_deadline()[0], seconds))
                self.paused.set()
            pause(seconds)

        self.agent._pause_after_failure = failed  # type: ignore[method-assign]
        self.agent._pause = recorded  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def device_id(self) -> str:
        return self.state.load_config().device_id

    def _before_upload(self, entry: OutboxEntry) -> None:
        self.reached_upload.set()
        if self._hold is not None:
            assert self._hold.wait(60)

    def _run(self) -> None:
        try:
            self.agent.run(max_rounds=1)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop()
        if self.thread.is_alive():
            self.thread.join(30)
        self.client.close()


def test_a_paced_round_open_across_a_restart_completes_within_its_deadline(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    """Three of four devices are picked. Two fetch their assignments and train; the
    coordinator stops as they upload, and their uploads fail: holding work, they retry
    within a second (not the idle pause of 20 s or more) and are accepted once it is back.
    The third picked device checks in only while the coordinator is down: idle, it pauses a
    random part of its pacing interval, as before, and misses the round; the restarted
    coordinator replaces it with the fourth device, which checks in after the restart. The
    round closes with three updates, well before its deadline."""
    data = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    local = LocalData(data.X_train[:40], data.y_train[:40], data.X_test[:10], data.y_test[:10])
    port = free_port()
    released = threading.Event()  # the coordinator is down: the held uploads may go
    devices: dict[str, _Device] = {}
    with ExitStack() as outer:
        first_stack = ExitStack()
        outer.callback(first_stack.close)
        first = first_stack.enter_context(_serving(settings, tls_paths, port))
        token = make_token(first, max_uses=4)
        for i in range(4):
            enroll_device(
                tmp_path / f"d{i}", url=first.url, token=token, ca_file=str(first.ca_file), seed=i
            )
            device = _Device(tmp_path / f"d{i}", local, hold=released)
            outer.callback(device.stop)
            # Seen (and told its slot) before the task exists, as a paced fleet is.
            assert device.client.get_work(0) is None
            devices[device.device_id] = device
        task_id = create_task(
            first,
            model={"architecture": "softmax", "input_dim": 64, "num_classes": 10},
            aggregation={
                "clients_per_round": 3,
                "over_selection": 0.0,
                "min_updates": 3,
                "round_deadline_s": 120,
                "num_rounds": 1,
            },
        )
        rnd = db.wait_round(task_id, 1)
        picked = sorted(a.device_id for a in db.assignments(task_id))
        assert len(picked) == 3
        # The one told the longest sleep (uniform over the no-demand period of 600 s) is the
        # one whose check-in fails: an idle pause drawn from that interval is a long one.
        missing = max(picked, key=lambda d: devices[d].client.reconnect_s or 0.0)
        working = [d for d in picked if d != missing]
        (spare,) = set(devices) - set(picked)
        for device_id in working:
            devices[device_id].start()
        for device_id in working:
            assert devices[device_id].reached_upload.wait(60)

        for device in devices.values():  # nothing for the server to drain (the two in
            device.client.drop_connection()  # their upload hook wait, the others sleep)
        first_stack.close()  # the coordinator stops, the round open
        stopped = time.time()
        late = devices[missing]
        interval = late.client.reconnect_s
        assert interval is not None and interval > ERROR_PAUSE_S
        late.start()  # its check-in fails: an idle device, it pauses
        assert late.paused.wait(30)
        released.set()  # the held uploads fail now
        for device_id in working:
            assert devices[device_id].paused.wait(30)

        second = outer.enter_context(_serving(settings, tls_paths, port))
        restarted = time.time()
        devices[spare].start()  # an idle device that checks in after the restart
        closed = wait_until(
            lambda: (r := db.round(task_id, 1)) is not None and r.status == "closed" and r,
            timeout=90,
        )
        for device in devices.values():
            device.stop()
            assert not device.thread.is_alive() and not device.errors, device.errors
            assert device.state.outbox.entries() == []

        status = {a.device_id: a.status for a in db.assignments(task_id)}
        assert status == {
            working[0]: "uploaded",
            working[1]: "uploaded",
            spare: "uploaded",
            missing: "cancelled",  # replaced: never counted as a drop
        }
        assert db.device(missing).num_dropped == 0
        assert {u.device_id for u in db.updates(task_id)} == {*working, spare}
        assert rnd.opened_at.timestamp() < stopped < restarted
        assert closed.closed_at is not None and closed.deadline_at is not None
        assert restarted < closed.closed_at.timestamp() < closed.deadline_at.timestamp()
        # The devices that held work retried quickly (jittered, capped), never pausing as idle.
        for device_id in working:
            pauses = devices[device_id].pauses
            assert pauses and all(held for held, _ in pauses), pauses
            assert all(0 < s <= WORK_RETRY.cap_s for _, s in pauses), pauses
        # The idle one took the idle fleet's pause: a random part of its interval, drawn as
        # the agent draws it.
        expected = paced_retry_s(interval, ERROR_PAUSE_S, np.random.default_rng([SEED, 0x7E7]))
        assert late.pauses[0] == (False, expected)
        assert ERROR_PAUSE_S < expected <= interval
        assert second.url == first.url


# -- which devices a round replaces (the rule, at chosen instants) ---------------------------


def _replace_at(coordinator: Coordinator, task_id: int, number: int, now: datetime) -> list[str]:
    """Run the round's replacement once, as the scheduler does, at ``now``."""
    runtime = coordinator.app.state.runtime
    liveness = pace.liveness_for(runtime)
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        rnd = session.scalar(select(Round).where(Round.task_id == task_id, Round.number == number))
        assert task is not None and rnd is not None
        cfg = AggregationConfig.from_dict(task.aggregation)
        return rounds.replace_missed(session, task, rnd, cfg, now=now, liveness=liveness)


def test_a_round_replaces_a_missed_device_only_with_one_that_comes_within_its_window(
    coordinator: Coordinator, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scheduler's own ticks (at the real time) see nobody overdue: the test picks the
    # instants at which the rule runs.
    monkeypatch.setattr(rounds, "MISSED_GRACE_S", 1000.0)
    with fleet_of(coordinator, 3) as fleet:
        for device in fleet:  # seen before the task, as a paced fleet is
            assert device.work() is None
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 2,
                "over_selection": 0.0,
                "min_updates": 2,
                "round_deadline_s": 3600,
                "num_rounds": 1,
            },
        )
        rnd = db.wait_round(task_id, 1)
        came, missing = sorted(a.device_id for a in db.assignments(task_id))
        (spare,) = {d.device_id for d in fleet} - {came, missing}
        work = fleet.by_id(came).work()  # one picked device comes and takes its assignment
        assert work is not None and work["round_id"] == rnd.id
        opened = rnd.opened_at
        later = opened + timedelta(seconds=1100)  # every expected check-in long past
        assert _replace_at(coordinator, task_id, 1, opened + timedelta(seconds=1)) == []
        # The spare's slot passed unseen (it comes at an unknown time): no replacement.
        assert _replace_at(coordinator, task_id, 1, later) == []
        assert {a.device_id: a.status for a in db.assignments(task_id)} == {
            came: "assigned",
            missing: "assigned",
        }
        # Seen just before: its next slot is within the window. It replaces the missing one
        # (the one that came keeps its assignment).
        with db.engine.begin() as conn:
            conn.execute(
                update(Device)
                .where(Device.id == spare)
                .values(last_seen_at=later - timedelta(seconds=1))
            )
        # Not with less than a window left before the deadline.
        assert rnd.deadline_at is not None
        assert _replace_at(coordinator, task_id, 1, rnd.deadline_at - timedelta(seconds=10)) == []
        woken = _replace_at(coordinator, task_id, 1, later)
        assert sorted(woken) == sorted([missing, spare])
        assert {a.device_id: a.status for a in db.assignments(task_id)} == {
            came: "assigned",
            missing: "cancelled",
            spare: "assigned",
        }
        assert db.round(task_id, 1).num_assigned == 3  # type: ignore[union-attr]
        assert db.device(missing).num_dropped == 0
        assert _replace_at(coordinator, task_id, 1, later) == []  # nothing left to replace
