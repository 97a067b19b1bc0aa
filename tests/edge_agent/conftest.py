"""A real coordinator for the agent's integration tests: the FastAPI app served by uvicorn with
TLS on a loopback port, a fresh migrated SQLite database per test, and helpers to create tasks
and enroll devices through the public REST API."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.coordinator.app import create_app
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope
from fedge.coordinator.secrets import create_api_key
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths, create_ca_and_server_cert
from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.sim.datasets import Dataset, load_dataset
from fedge.edge_agent.state import State
from fedge.edge_agent.transport import RetryPolicy
from tests.support import databases
from tests.support.servers import serve_in_thread

SOFTMAX = {"architecture": "softmax", "input_dim": 64, "num_classes": 10, "hidden": [], "seed": 0}


@pytest.fixture(scope="session")
def agent_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsPaths:
    return create_ca_and_server_cert(tmp_path_factory.mktemp("agent-tls"))


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))


def shard(dataset: Dataset, index: int, *, size: int = 120) -> LocalData:
    """A slice of the training split (and a little evaluation data) for device ``index``."""
    lo = index * size
    X, y = dataset.X_train[lo : lo + size], dataset.y_train[lo : lo + size]
    return LocalData(X[:-20], y[:-20], X[-20:], y[-20:])


def wait_for(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``condition`` (another process or thread must make it true) until a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")


@dataclass
class LiveCoordinator:
    url: str
    ca_file: str
    admin_key: str
    admin: AdminClient
    root: Path
    agents: list[Agent] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    running: list[Agent] = field(default_factory=list)

    def create_task(self, *, start: bool = True, **sections: Any) -> dict[str, Any]:
        """A started task (a draft with ``start=False``); ``sections`` override parts of the
        body (merged one level; a ``model`` with a ``spec`` replaces the built-in one).

        Waits first until the coordinator has seen every running agent poll, so that the
        first round can select all of them."""
        for agent in self.running:
            device_id = agent.state.load_config().device_id
            wait_for(
                lambda d=device_id: self.admin.get_device(d)["last_seen_at"],
                what=f"device {device_id} to poll",
            )
        body: dict[str, Any] = {
            "name": "integration",
            "model": dict(SOFTMAX),
            "aggregation": {
                "mode": "sync",
                "num_rounds": 1,
                "clients_per_round": 1,
                "over_selection": 0.0,
                "min_updates": 1,
                "round_deadline_s": 30,
                "max_staleness": 2,
            },
            "compression": {"topk_fraction": 0.05, "bits": 4, "chunk": 64, "error_feedback": True},
            "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        }
        for key, value in sections.items():
            merge = isinstance(value, dict) and not (key == "model" and "spec" in value)
            body[key] = {**body.get(key, {}), **value} if merge else value
        task = self.admin.create_task(body)
        if not start:
            return dict(task)
        return dict(self.admin.start_task(task["id"]))

    def enroll(self, name: str, *, seed: int = 1) -> Path:
        token = self.admin.create_enrollment_token(label=name)["token"]
        state_dir = self.root / name
        enroll_device(
            state_dir, url=self.url, token=token, ca_file=self.ca_file, name=name, seed=seed
        )
        return state_dir

    def agent(self, state_dir: Path, data: LocalData, **kwargs: Any) -> Agent:
        state = State(state_dir)
        stop = threading.Event()
        client = open_client(
            state,
            retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2),
            sleep=stop.wait,
            interrupted=stop.is_set,
        )
        options: dict[str, Any] = {"poll_wait": 1.0, "error_pause_s": 0.1} | kwargs
        agent = Agent(
            state=state,
            client=client,
            data=data,
            seed=state.load_config().seed,
            stop_event=stop,
            **options,
        )
        self.agents.append(agent)
        return agent

    def start(self, agent: Agent, **run: Any) -> threading.Thread:
        """Run ``agent.run(**run)`` in a thread (stopped and joined at teardown)."""
        errors: list[BaseException] = []

        def target() -> None:
            try:
                agent.run(**run)
            except BaseException as exc:
                errors.append(exc)
                raise

        thread = threading.Thread(target=target, daemon=True)
        thread.errors = errors  # type: ignore[attr-defined]
        thread.start()
        self.threads.append(thread)
        self.running.append(agent)
        return thread

    def finish(self, threads: list[threading.Thread], timeout: float = 20.0) -> None:
        """Wait for agents started with a round limit to end their runs. A task completes when
        the coordinator has taken the last update, which can be before the agent has read the
        answer: an agent's counts are final only once its run has ended."""
        for thread in threads:
            thread.join(timeout)
            assert not thread.is_alive(), "an agent did not end its run after its rounds"
            assert not thread.errors, thread.errors  # type: ignore[attr-defined]

    def task(self, task_id: int) -> dict[str, Any]:
        return dict(self.admin.get_task(task_id))

    def rounds(self, task_id: int) -> list[dict[str, Any]]:
        return list(self.admin.iterate(f"/tasks/{task_id}/rounds"))


def _admin_key(settings: Settings) -> str:
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            _, secret = create_api_key(session, name="agent tests", role="admin")
    finally:
        engine.dispose()
    return secret


@contextmanager
def live_coordinator(
    root: Path, sqlite_template: databases.SqliteTemplate, agent_tls: TlsPaths
) -> Iterator[LiveCoordinator]:
    """A coordinator serving a fresh SQLite database in ``root`` (a test may start several)."""
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=root / "coordinator",
        database_url=sqlite_template.fresh(root),
        tls_cert=agent_tls.server_cert,
        tls_key=agent_tls.server_key,
        scheduler_interval_s=0.05,
        long_poll_recheck_s=0.2,
    )
    key = _admin_key(settings)
    with serve_in_thread(
        create_app(settings), certfile=agent_tls.server_cert, keyfile=agent_tls.server_key
    ) as url:
        admin = AdminClient(url, key, ca_file=str(agent_tls.ca_cert))
        live = LiveCoordinator(url, str(agent_tls.ca_cert), key, admin, root / "devices")
        try:
            yield live
        finally:
            for agent in live.agents:
                agent.stop()
            for thread in live.threads:
                thread.join(10)
            for agent in live.agents:
                agent.client.close()
            admin.close()


@pytest.fixture
def live(
    tmp_path: Path, sqlite_template: databases.SqliteTemplate, agent_tls: TlsPaths
) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path, sqlite_template, agent_tls) as live:
        yield live
