"""A simulated fleet against a real coordinator: async mode, and dropouts the coordinator sees."""

from __future__ import annotations

import stat

import numpy as np

from fedge.edge_agent.sim.faults import FaultConfig
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import dirichlet_partition
from fedge.edge_agent.state import State
from tests.edge_agent.conftest import wait_for


def make_fleet(live, digits, tmp_path, n, faults):
    parts = dirichlet_partition(digits.y_train[:600], n, 1.0, np.random.default_rng(0))
    shards = [(digits.X_train[p], digits.y_train[p]) for p in parts]
    fleet = Fleet(
        url=live.url,
        ca_file=live.ca_file,
        root=tmp_path / "fleet",
        shards=shards,
        seed=5,
        faults=faults,
        poll_wait=1.0,
    )
    token = live.admin.create_enrollment_token(max_uses=n)["token"]
    ids = fleet.enroll(token)
    assert len(set(ids)) == n
    return fleet


def test_async_fleet_completes_a_task(live, digits, tmp_path):
    fleet = make_fleet(live, digits, tmp_path, 4, FaultConfig())
    with fleet:
        fleet.start()
        for device in fleet.devices:
            device_id = State(device.state_dir).load_config().device_id
            wait_for(lambda d=device_id: live.admin.get_device(d)["last_seen_at"])
        task = live.create_task(
            aggregation={"mode": "async", "num_rounds": 2, "buffer_size": 2, "max_concurrency": 4}
        )
        wait_for(lambda: live.task(task["id"])["status"] == "completed", what="the task")
    stats = fleet.stats()
    assert stats.errors == []
    assert stats.uploads >= 4 and stats.agents.uploaded == stats.uploads
    assert stats.upload_bytes < stats.uploads * 4 * 650
    assert sum(count for count, _ in stats.uploads_by_base_version.values()) == stats.uploads
    for device in fleet.devices:
        key = device.state_dir / "identity.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_dropouts_are_seen_by_the_coordinator(live, digits, tmp_path):
    fleet = make_fleet(live, digits, tmp_path, 3, FaultConfig(dropout=1.0))
    with fleet:
        fleet.start()
        for device in fleet.devices:
            device_id = State(device.state_dir).load_config().device_id
            wait_for(lambda d=device_id: live.admin.get_device(d)["last_seen_at"])
        task = live.create_task(
            aggregation={
                "num_rounds": 1,
                "clients_per_round": 3,
                "min_updates": 1,
                "round_deadline_s": 1.5,
            }
        )
        first = wait_for(
            lambda: next((r for r in live.rounds(task["id"]) if r["status"] == "failed"), None),
            what="the first round to fail",
        )
    assert (first["num_assigned"], first["num_received"], first["num_dropped"]) == (3, 0, 3)
    stats = fleet.stats()
    assert stats.agents.dropped >= 3 and stats.uploads == 0


def test_socket_bytes_are_counted_per_device(live, digits, tmp_path):
    """With count_socket each device goes through its own counting relay: its enrollment and
    its work are counted apart, and the socket carries its bodies plus an envelope."""
    parts = dirichlet_partition(digits.y_train[:400], 3, 1.0, np.random.default_rng(1))
    fleet = Fleet(
        url=live.url,
        ca_file=live.ca_file,
        root=tmp_path / "fleet",
        shards=[(digits.X_train[p], digits.y_train[p]) for p in parts],
        seed=7,
        poll_wait=1.0,
        count_socket=True,
    )
    fleet.enroll(live.admin.create_enrollment_token(max_uses=3)["token"])
    ports = {State(d.state_dir).load_config().url.rsplit(":", 1)[1] for d in fleet.devices}
    assert len(ports) == 3 and live.url.rsplit(":", 1)[1] not in ports
    with fleet:
        fleet.start()
        task = live.create_task(
            aggregation={"mode": "async", "num_rounds": 2, "buffer_size": 2, "max_concurrency": 3}
        )
        wait_for(lambda: live.task(task["id"])["status"] == "completed", what="the task")
    sockets = fleet.socket_counts()
    assert [s.index for s in sockets] == [0, 1, 2]
    for device, sock in zip(fleet.devices, sockets, strict=True):
        assert device.client is not None
        bodies = device.client.traffic
        # a TLS handshake at least each way during enrollment, and a fresh one afterwards
        assert sock.enrollment.up > 500 and sock.enrollment.down > 1000
        assert sock.enrollment.connections >= 1 and sock.work.connections >= 1
        # every body crossed the socket, inside TLS records and HTTP requests
        assert sock.work.up > bodies.upload_bytes + 500
        assert sock.work.down > bodies.model_bytes + 1000
    assert sum(s.work.up for s in sockets) > fleet.stats().upload_bytes
