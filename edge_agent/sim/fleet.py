"""Many simulated devices in one process: one thread, state dir and data shard per device.

Each device is a real :class:`~fedge.edge_agent.agent.Agent` with its own Ed25519 identity, its
own HTTPS client and its own state directory, talking to a real coordinator; only the device
hardware is simulated. Faults (:mod:`fedge.edge_agent.sim.faults`) are drawn per device from
generators derived from one seed, so a run is reproducible up to thread timing, and reach each agent
from outside through its hooks (:class:`~fedge.edge_agent.sim.faults.FaultHooks`).

Reproducible experiments (sync, no faults): the devices' names (``sim-000``...) and seeds
follow from the fleet's seed; a task with ``selection_seed`` picks the same devices per round
on any fresh coordinator, and ``seed_training_by_version=True`` seeds each device's training
by (task, base version) rather than by the coordinator's assignment id, so two runs train
alike (``tests/edge_agent/test_reproducible_runs.py``).

With ``count_socket=True`` every device talks to the coordinator through its own
:class:`~fedge.edge_agent.sim.relay.CountingRelay`, so the bytes each device sends and receives
on its sockets (TLS, HTTP headers, signatures, polls and bodies) are counted per device:
:meth:`Fleet.socket_counts`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from fedge.edge_agent.agent import Agent, AgentStats, FatalAgentError
from fedge.edge_agent.client import CoordinatorClient
from fedge.edge_agent.data import LocalData, check_arrays, split_local
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.sim.faults import FaultConfig, FaultHooks, FaultSchedule, FaultSource
from fedge.edge_agent.sim.relay import CountingRelay, Counts
from fedge.edge_agent.state import State
from fedge.edge_agent.trainers import TrainerFactory
from fedge.edge_agent.transport import RetryPolicy

log = logging.getLogger(__name__)


@dataclass
class SimulatedDevice:
    index: int
    state_dir: Path
    data: LocalData
    seed: int
    faults: FaultSource  # replaceable before start() (a benchmark's own schedule)
    agent: Agent | None = None
    client: CoordinatorClient | None = None
    thread: threading.Thread | None = None
    error: BaseException | None = None
    relay: CountingRelay | None = None  # with count_socket: this device's counting relay
    enrollment: Counts = field(default_factory=Counts)  # socket bytes of its enrollment


@dataclass(frozen=True)
class DeviceSocket:
    """One device's socket bytes: its enrollment, and everything after it (``work``)."""

    index: int
    enrollment: Counts
    work: Counts


@dataclass
class FleetStats:
    """Totals over all devices (``uploads_by_base_version``: version -> (count, bytes))."""

    agents: AgentStats = field(default_factory=AgentStats)
    upload_bytes: int = 0
    uploads: int = 0
    model_bytes: int = 0
    downloads: int = 0
    errors: list[str] = field(default_factory=list)
    uploads_by_base_version: dict[int, tuple[int, int]] = field(default_factory=dict)


class Fleet:
    """Enroll, start and stop a simulated fleet."""

    def __init__(
        self,
        *,
        url: str,
        ca_file: str | None,
        root: str | Path,
        shards: Sequence[tuple[np.ndarray, np.ndarray]],
        seed: int,
        faults: FaultConfig | None = None,
        poll_wait: float = 2.0,
        eval_fraction: float = 0.2,
        trainer_factory: TrainerFactory | None = None,
        retry: RetryPolicy | None = None,
        count_socket: bool = False,
        seed_training_by_version: bool = False,
    ) -> None:
        self.url = url
        self.count_socket = count_socket
        self.seed_training_by_version = seed_training_by_version
        self.ca_file = ca_file
        self.root = Path(root)
        self.poll_wait = poll_wait
        self.trainer_factory = trainer_factory
        self.retry = retry or RetryPolicy(attempts=6, base_delay=0.2, max_delay=2.0)
        self._stop = threading.Event()
        fault_config = faults or FaultConfig()
        seeds = np.random.SeedSequence(seed).spawn(len(shards))
        self.devices: list[SimulatedDevice] = []
        for i, ((X, y), seq) in enumerate(zip(shards, seeds, strict=True)):
            agent_seq, fault_seq, split_seq = seq.spawn(3)
            x32, labels = check_arrays(X, y)
            data = split_local(
                x32, labels, eval_fraction=eval_fraction, rng=np.random.default_rng(split_seq)
            )
            self.devices.append(
                SimulatedDevice(
                    index=i,
                    state_dir=self.root / f"device-{i:03d}",
                    data=data,
                    seed=int(agent_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)),
                    faults=FaultSchedule(fault_config, np.random.default_rng(fault_seq)),
                )
            )

    def _device_url(self, device: SimulatedDevice) -> str:
        """The URL a device is enrolled with: the coordinator's, or its own counting relay's
        (which forwards to the coordinator; the relay's host keeps the name the coordinator's
        certificate is checked against)."""
        if not self.count_socket:
            return self.url
        parts = urlsplit(self.url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"count_socket needs a URL with a host and a port, got {self.url}")
        if device.relay is None:
            device.relay = CountingRelay(parts.hostname, parts.port).start()
        return f"{parts.scheme}://{parts.hostname}:{device.relay.port}"

    def enroll(self, token: str) -> list[str]:
        """Enroll every device with one (multi-use) token; their device ids."""
        ids = []
        for device in self.devices:
            config = enroll_device(
                device.state_dir,
                url=self._device_url(device),
                token=token,
                ca_file=self.ca_file,
                name=f"sim-{device.index:03d}",
                capabilities={"simulated": True, "examples": device.data.num_train},
                seed=device.seed,
                retry=self.retry,
            )
            if device.relay is not None:
                device.enrollment = device.relay.counts()
            ids.append(config.device_id)
        return ids

    def start(self) -> None:
        for device in self.devices:
            state = State(device.state_dir)
            device.client = open_client(
                state, retry=self.retry, sleep=self._stop.wait, interrupted=self._stop.is_set
            )
            device.agent = Agent(
                state=state,
                client=device.client,
                data=device.data,
                trainer_factory=self.trainer_factory,
                seed=device.seed,
                hooks=FaultHooks(device.faults, seed_by_version=self.seed_training_by_version),
                poll_wait=self.poll_wait,
                error_pause_s=min(1.0, self.poll_wait),
                stop_event=self._stop,
            )
            device.thread = threading.Thread(
                target=self._run, args=(device,), name=f"sim-{device.index:03d}", daemon=True
            )
            device.thread.start()

    def _run(self, device: SimulatedDevice) -> None:
        assert device.agent is not None
        try:
            device.agent.run()
        except FatalAgentError as exc:
            log.warning("device %d stopped: %s", device.index, exc)
            device.error = exc
        except Exception as exc:
            if not self._stop.is_set():
                log.exception("device %d crashed", device.index)
                device.error = exc

    def stop(self, *, timeout: float | None = None) -> None:
        """Stop every agent and wait for the threads (at most about one long-poll)."""
        self._stop.set()
        for device in self.devices:
            if device.agent is not None:
                device.agent.stop()
        limit = timeout if timeout is not None else self.poll_wait + 10.0
        for device in self.devices:
            if device.thread is not None:
                device.thread.join(limit)
        for device in self.devices:
            if device.client is not None and not (device.thread and device.thread.is_alive()):
                device.client.close()
        for device in self.devices:
            if device.relay is not None and not (device.thread and device.thread.is_alive()):
                device.relay.close()  # its counts stay readable

    def socket_counts(self) -> list[DeviceSocket]:
        """Socket bytes per device (``count_socket=True``; empty otherwise). Counted as they
        cross each device's relay, so final once the fleet has stopped."""
        out = []
        for device in self.devices:
            if device.relay is not None:
                total = device.relay.counts()
                out.append(DeviceSocket(device.index, device.enrollment, total - device.enrollment))
        return out

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> FleetStats:
        total = FleetStats()
        for device in self.devices:
            if device.agent is not None:
                for f in fields(AgentStats):
                    name = f.name
                    value = getattr(total.agents, name) + getattr(device.agent.stats, name)
                    setattr(total.agents, name, value)
                for version, size in list(device.agent.uploads):
                    count, nbytes = total.uploads_by_base_version.get(version, (0, 0))
                    total.uploads_by_base_version[version] = (count + 1, nbytes + size)
            if device.client is not None:
                traffic = device.client.traffic
                total.upload_bytes += traffic.upload_bytes
                total.uploads += traffic.uploads
                total.model_bytes += traffic.model_bytes
                total.downloads += traffic.downloads
            if device.error is not None:
                total.errors.append(f"device {device.index}: {device.error}")
        return total
