"""Secure aggregation through the real stack: a coordinator process over HTTPS, real agents
(``fedge.edge_agent.agent.Agent`` in threads, their state on disk), the database of the test
leg (SQLite file, or PostgreSQL with ``FEDGE_TEST_POSTGRES_URL``).

The agents train with a trainer whose update is known to the test (``base + delta`` of the
device's own seeded generator), so the test computes independently what each device's
quantized input is (``quantized_input`` with the device's rounding generator) and what the
new model must be: ``float32(w0 + sum of the survivors' inputs * B / s / survivors)`` on the
support, ``w0`` elsewhere, bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from fedge.coordinator.engine.secure import round_config
from fedge.coordinator.models import Round, SecAggMember, SecAggRound
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.client import Work
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.hooks import AgentHooks
from fedge.edge_agent.state import State
from fedge.edge_agent.trainers import TrainResult
from fedge.edge_agent.transport import RetryPolicy
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.secagg import RoundConfig, flatten, quantized_input
from tests.support.device import make_token
from tests.support.process import CoordinatorProcess, coordinator_process
from tests.support.rounds import Db, action, create_task, wait_until

pytestmark = pytest.mark.slow

MODEL = {"architecture": "softmax", "input_dim": 4, "num_classes": 3}
#: k = 8 of the model's 15 values: a proper shared support.
COMPRESSION = {"topk_fraction": 0.5, "bits": 8, "chunk": 64, "error_feedback": True}
SECURE = {"bound": 0.5, "grid_bits": 16, "planned_dropout": 0.34}
PROCESS_ENV = {
    "FEDGE_SCHEDULER_INTERVAL_S": "0.1",
    "FEDGE_LEASE_TTL_S": "1",
    "FEDGE_LONG_POLL_RECHECK_S": "0.2",
    "FEDGE_DEVICE_RATE_PER_MINUTE": "100000",
}


def aggregation(n: int, *, min_updates: int, deadline_s: float, rounds: int = 1) -> dict[str, Any]:
    return {
        "clients_per_round": n,
        "over_selection": 0.0,
        "min_updates": min_updates,
        "round_deadline_s": deadline_s,
        "num_rounds": rounds,
        "weighting": "equal",
        "secure": SECURE,
    }


def known_delta(seed: int, spec: ModelSpec, round_number: int) -> Weights:
    """The update device ``seed`` makes in a round (values within the grid's bound)."""
    rng = np.random.default_rng([seed, round_number, 77])
    return {t.name: rng.uniform(-0.3, 0.3, size=t.shape).astype(np.float32) for t in spec.tensors}


def device_delta(seed: int, spec: ModelSpec, base: Weights) -> Weights:
    """What the agent quantizes: ``local - base`` in float32, where ``local`` is
    ``float32(base + known_delta)``: not ``known_delta`` itself (rounded by the addition), and
    the stochastic rounding can move by a grid step with it."""
    delta = known_delta(seed, spec, 1)
    return {name: (base[name] + delta[name]).astype(np.float32) - base[name] for name in delta}


class KnownTrainer:
    """Returns ``base + known_delta``: the test knows every device's update."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def train(self, weights: Weights, config: Any, rng: np.random.Generator, **_: Any) -> Any:
        delta = known_delta(self.seed, spec_of(weights), 1)
        local = {name: (weights[name] + delta[name]).astype(np.float32) for name in weights}
        return TrainResult(local, num_examples=10)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return {}


class Crash(BaseException):
    """Ends an agent's thread the way a crash ends its process: nothing is cleaned up."""


@dataclass
class Script(AgentHooks):
    """What one agent does at each message of round 1: ``silent`` (go silent before it),
    ``hold`` (wait for the event before posting it), ``crash`` (die before posting it)."""

    silent: str | None = None
    hold: str | None = None
    crash: str | None = None
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)
    first_round: int | None = None

    def secagg_post(self, work: Work, message: str) -> bool:
        if self.first_round is None:
            self.first_round = work.round_id
        if work.round_id != self.first_round:  # the script is for the first round only
            return True
        if message == self.crash:
            self.crash = None  # once
            self.reached.set()
            raise Crash(message)
        if message == self.hold:
            self.reached.set()
            self.release.wait(120)
        return message != self.silent


@dataclass
class Fleet:
    agents: list[Agent]
    threads: list[threading.Thread]
    errors: list[BaseException]
    stop: threading.Event
    seeds: list[int]
    device_ids: list[str]


@contextmanager
def real_agents(server: CoordinatorProcess, root: Path, scripts: list[Script]) -> Iterator[Fleet]:
    stop = threading.Event()
    fleet = Fleet([], [], [], stop, [], [])
    try:
        for i, script in enumerate(scripts):
            state_dir = root / f"agent{i}"
            seed = 101 + i
            enroll_device(
                state_dir,
                url=server.url,
                token=make_token(server),
                ca_file=str(server.ca_file),
                seed=seed,
            )
            fleet.seeds.append(seed)
            fleet.device_ids.append(State(state_dir).load_config().device_id)
            start_agent(fleet, state_dir, seed, script)
        yield fleet
    finally:
        stop.set()
        for agent in fleet.agents:
            agent.stop()
        for thread in fleet.threads:
            thread.join(30)
        for agent in fleet.agents:
            agent.client.close()


def start_agent(fleet: Fleet, state_dir: Path, seed: int, script: Script) -> None:
    state = State(state_dir)
    client = open_client(
        state,
        retry=RetryPolicy(attempts=4, base_delay=0.1, max_delay=0.5),
        sleep=fleet.stop.wait,
        interrupted=fleet.stop.is_set,
    )
    empty = np.zeros((0, 4), dtype=np.float32)
    agent = Agent(
        state=state,
        client=client,
        data=LocalData(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64)),
        trainer_factory=lambda _model, _data: KnownTrainer(seed),
        seed=seed,
        hooks=script,
        stop_event=threading.Event(),
        poll_wait=1.0,
        error_pause_s=0.2,
        report_capabilities=False,
        secagg_poll_s=0.1,
    )

    def run() -> None:
        try:
            agent.run()
        except Crash:
            pass
        except BaseException as exc:  # reported by the test
            fleet.errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    fleet.agents.append(agent)
    fleet.threads.append(thread)
    thread.start()


def spec_of(weights: Mapping[str, np.ndarray]) -> ModelSpec:
    tensors = [{"name": name, "shape": list(w.shape)} for name, w in weights.items()]
    return ModelSpec.from_dict(tensors)


def secure_state(
    db: Db, task_id: int, number: int
) -> tuple[Round, SecAggRound, list[SecAggMember]]:
    def read(session: Any) -> tuple[Round, SecAggRound, list[SecAggMember]]:
        rnd = session.scalar(select(Round).where(Round.task_id == task_id, Round.number == number))
        row = session.get(SecAggRound, rnd.id)
        members = list(
            session.scalars(
                select(SecAggMember)
                .where(SecAggMember.round_id == rnd.id)
                .order_by(SecAggMember.cohort_index)
            )
        )
        return rnd, row, members

    return db.read(read)


def wait_secure_round(db: Db, task_id: int, number: int, timeout: float = 60) -> RoundConfig:
    def probe() -> RoundConfig | None:
        rnd = db.round(task_id, number)
        if rnd is None:
            return None
        _, row, _ = secure_state(db, task_id, number)
        if row is None:
            return None
        return round_config(row, number=number)

    return wait_until(probe, timeout=timeout)


def expected_model(
    db: Db, task_id: int, number: int, fleet: Fleet, spec: ModelSpec, w0: Weights
) -> Weights:
    """The new model from the survivors' quantized inputs, computed here."""
    _, row, members = secure_state(db, task_id, number)
    cfg = round_config(row, number=number)
    survivors = [m for m in members if m.masked is not None]
    total = np.zeros(cfg.k, dtype=np.int64)
    for m in survivors:
        seed = fleet.seeds[fleet.device_ids.index(m.device_id)]
        rng = np.random.default_rng([seed, m.assignment_id, 2])  # the device's rounding
        delta = flatten(device_delta(seed, spec, w0), spec)
        q, _ = quantized_input(cfg, delta, np.zeros(cfg.size, np.float32), rng)
        total += q.view(np.int32).astype(np.int64)
    mean = np.zeros(cfg.size, dtype=np.float64)
    mean[cfg.support] = total.astype(np.float64) * (cfg.grid.step / len(survivors))
    flat_w0 = flatten(w0, spec).astype(np.float64)
    new = (flat_w0 + mean).astype(np.float32)
    out, start = {}, 0
    for t in spec.tensors:
        out[t.name] = new[start : start + t.size].reshape(t.shape)
        start += t.size
    return out


def assert_bitwise_equal(got: Weights, want: Weights) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def start_task(server: CoordinatorProcess, db: Db, fleet: Fleet, agg: dict[str, Any]) -> int:
    """Create the task once every agent polled (so the whole fleet is eligible), then start
    it."""
    task_id = create_task(
        server, aggregation=agg, compression=COMPRESSION, model=MODEL, start=False
    )
    wait_until(lambda: all(db.device(d).last_seen_at for d in fleet.device_ids), timeout=60)
    action(server, task_id, "start")
    return task_id


def start_server(
    stack: ExitStack, settings: Settings, tls_paths: TlsPaths, workdir: Path, port: int = 0
) -> CoordinatorProcess:
    return stack.enter_context(
        coordinator_process(
            settings, workdir, ca_file=tls_paths.ca_cert, env=PROCESS_ENV, port=port
        )
    )


def test_the_new_model_is_the_exact_mean_of_the_survivors_with_a_third_dropping(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    """Nine devices; one goes silent after sharing (its pairwise masks must be removed from
    its neighbours' uploads), two after their masked upload (their inputs count; the others'
    shares unmask them): a third of the cohort drops after the masking started."""
    scripts = [Script(silent="masked"), Script(silent="unmask"), Script(silent="unmask")]
    scripts += [Script() for _ in range(6)]
    with ExitStack() as stack:
        server = start_server(stack, settings, tls_paths, tmp_path / "c")
        fleet = stack.enter_context(real_agents(server, tmp_path, scripts))
        task_id = start_task(server, db, fleet, aggregation(9, min_updates=4, deadline_s=40))
        cfg = wait_secure_round(db, task_id, 1)
        assert (cfg.cohort, cfg.degree, cfg.threshold, cfg.k) == (9, 8, 5, 8)
        wait_until(lambda: db.task(task_id).current_version == 1, timeout=90)
        assert not fleet.errors
        rnd, row, members = secure_state(db, task_id, 1)
        assert rnd.status == "closed" and row.phase == "done"
        silent = {fleet.device_ids[i] for i in range(3)}
        by_device = {m.device_id: m for m in members}
        assert by_device[fleet.device_ids[0]].masked is None  # dropped before its upload
        assert sum(m.masked is not None for m in members) == 8
        assert sum(m.unmask_response is not None for m in members) == 6
        assert row.num_included == 8 and rnd.num_received == 8
        assert all(by_device[d].unmask_response is None for d in silent)
        version = db.version(task_id, 1)
        assert version is not None and version.num_updates == 8
        assert version.metrics["secagg_included"] == 8
        w0 = db.weights(task_id, 0)
        got = db.weights(task_id, 1)
        spec = spec_of(w0)
        assert_bitwise_equal(got, expected_model(db, task_id, 1, fleet, spec, w0))
        # Only the support moved.
        moved = np.flatnonzero(flatten(got, spec) != flatten(w0, spec))
        assert set(moved) <= set(cfg.support.tolist()) and moved.size > 0
        assert db.updates(task_id) == []  # nothing was uploaded in the clear


def test_a_round_below_the_threshold_fails_cleanly_and_the_next_one_proceeds(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    """Six devices (complete graph, t = 3); in round 1 four go silent before sharing: two
    sharers cannot reach the threshold. The round fails naming the phase, nothing is applied,
    and round 2 (everyone back) builds version 1."""
    scripts = [Script(silent="shares") for _ in range(4)] + [Script() for _ in range(2)]
    with ExitStack() as stack:
        server = start_server(stack, settings, tls_paths, tmp_path / "c")
        fleet = stack.enter_context(real_agents(server, tmp_path, scripts))
        task_id = start_task(server, db, fleet, aggregation(6, min_updates=2, deadline_s=40))
        wait_secure_round(db, task_id, 1)
        failed = wait_until(
            lambda: (r := db.round(task_id, 1)) is not None and r.status == "failed" and r,
            timeout=60,
        )
        assert "phase shares" in failed.status_reason and "below_threshold" in (
            failed.status_reason
        )
        with server.admin() as admin:  # the API says so too
            body = admin.get(f"/api/v1/tasks/{task_id}/rounds").json()
        listed = {r["number"]: r for r in body["items"]}
        assert "below_threshold" in listed[1]["status_reason"]
        assert db.version(task_id, 1) is None or db.version(task_id, 1).round_id != failed.id
        wait_secure_round(db, task_id, 2)
        wait_until(lambda: db.task(task_id).current_version == 1, timeout=90)
        assert db.version(task_id, 1).round_id == db.round(task_id, 2).id
        assert not fleet.errors


@pytest.mark.parametrize("phase", ["advert", "shares", "masked", "unmask"])
def test_a_coordinator_killed_in_each_phase_resumes_it_with_the_same_lists(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db, phase: str
) -> None:
    """Every agent holds before posting its ``phase`` message, so the round is in that phase
    when the coordinator is SIGKILLed; a new process on the same port resumes the phase with
    what the earlier phases fixed (relayed bundles, unmask lists: same bytes), and the new
    model is still the exact mean."""
    scripts = [Script(hold=phase) for _ in range(6)]
    with ExitStack() as stack:
        first = start_server(stack, settings, tls_paths, tmp_path / "c1")
        fleet = stack.enter_context(real_agents(first, tmp_path, scripts))
        # Phase deadlines run on while the coordinator is down: long enough for the restart
        # and the agents' retries on a loaded machine (a phase with everyone in closes early).
        task_id = start_task(first, db, fleet, aggregation(6, min_updates=4, deadline_s=300))
        wait_until(lambda: all(s.reached.is_set() for s in scripts), timeout=60)
        _, row, before = secure_state(db, task_id, 1)
        assert row.phase == phase
        first.kill()
        port = int(first.url.rsplit(":", 1)[1])
        start_server(stack, settings, tls_paths, tmp_path / "c2", port=port)
        for script in scripts:
            script.release.set()
        wait_until(lambda: db.task(task_id).current_version == 1, timeout=120)
        assert not fleet.errors
        _, row, after = secure_state(db, task_id, 1)
        assert row.phase == "done" and row.num_included == 6
        for old, new in zip(before, after, strict=True):  # decided once, never recomputed
            for column in ("advert", "shares_out", "shares_in", "masked", "unmask_request"):
                if getattr(old, column) is not None:
                    assert getattr(new, column) == getattr(old, column), column
        w0 = db.weights(task_id, 0)
        spec = spec_of(w0)
        assert_bitwise_equal(
            db.weights(task_id, 1), expected_model(db, task_id, 1, fleet, spec, w0)
        )


def test_an_agent_restarted_in_a_phase_sends_the_same_messages(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    """One agent dies right after saving its masked upload (before posting it), another right
    after saving its unmask answer; each is started again on its state directory, gets the
    assignment again, retrains, and resumes from its saved round state: the same upload, one
    answer, and the exact sum of all six."""
    scripts = [Script(crash="masked"), Script(crash="unmask")] + [Script() for _ in range(4)]
    with ExitStack() as stack:
        server = start_server(stack, settings, tls_paths, tmp_path / "c")
        fleet = stack.enter_context(real_agents(server, tmp_path, scripts))
        task_id = start_task(server, db, fleet, aggregation(6, min_updates=4, deadline_s=300))
        for i in (0, 1):
            assert scripts[i].reached.wait(60)
            fleet.threads[i].join(30)
            saved = list((tmp_path / f"agent{i}" / "secagg").glob("round-*.state"))
            assert len(saved) == 1  # what it would have sent is on disk
            start_agent(fleet, tmp_path / f"agent{i}", fleet.seeds[i], Script())
        wait_until(lambda: db.task(task_id).current_version == 1, timeout=120)
        assert not fleet.errors
        _, row, members = secure_state(db, task_id, 1)
        assert row.num_included == 6
        assert all(m.unmask_response is not None for m in members)
        assert not list((tmp_path / "agent0" / "secagg").glob("round-*.state"))  # cleaned up
        w0 = db.weights(task_id, 0)
        spec = spec_of(w0)
        assert_bitwise_equal(
            db.weights(task_id, 1), expected_model(db, task_id, 1, fleet, spec, w0)
        )
