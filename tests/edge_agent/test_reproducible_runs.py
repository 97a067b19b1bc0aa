"""Reproducible experiments: two runs of one seeded sync task on fresh coordinators, with the
same simulated fleet, pick the same devices in every round and end with the same model
(``selection_seed`` and ``Fleet(seed_training_by_version=True)``; docs/rounds.md,
"Reproducible selection"). Without them, cohorts follow the random device ids."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from fedge.coordinator.tls import TlsPaths
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import dirichlet_partition
from fedge.shared.wire_model import decode_model
from tests.edge_agent.conftest import live_coordinator, wait_for
from tests.support import databases

DEVICES = 8
ROUNDS = 4
PER_ROUND = 3


def run_experiment(
    root: Path,
    sqlite_template: databases.SqliteTemplate,
    agent_tls: TlsPaths,
    digits: Any,
    *,
    selection_seed: int | None,
) -> tuple[list[list[str]], dict[str, np.ndarray]]:
    """(device names per round, final weights) of one run on a fresh coordinator."""
    parts = dirichlet_partition(digits.y_train[:480], DEVICES, 1.0, np.random.default_rng(3))
    with live_coordinator(root, sqlite_template, agent_tls) as live:
        fleet = Fleet(
            url=live.url,
            ca_file=live.ca_file,
            root=root / "fleet",
            shards=[(digits.X_train[p], digits.y_train[p]) for p in parts],
            seed=11,
            poll_wait=1.0,
            seed_training_by_version=True,
        )
        ids = fleet.enroll(live.admin.create_enrollment_token(max_uses=DEVICES)["token"])
        with fleet:
            fleet.start()
            for device_id in ids:
                wait_for(lambda d=device_id: live.admin.get_device(d)["last_seen_at"])
            aggregation: dict[str, Any] = {
                "num_rounds": ROUNDS,
                "clients_per_round": PER_ROUND,
                "min_updates": PER_ROUND,
                "selection_seed": selection_seed,
            }
            task = live.create_task(
                aggregation=aggregation,
                compression={"topk_fraction": 1.0, "bits": 32, "error_feedback": False},
            )
            wait_for(
                lambda: live.task(task["id"])["status"] == "completed", timeout=60, what="the task"
            )
        assert fleet.stats().errors == []
        weights = decode_model(live.admin.download_model(task["id"], "latest"))
        with sqlite3.connect(f"file:{root / 'fedge.db'}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT r.number, d.name FROM assignments a JOIN rounds r ON r.id = a.round_id "
                "JOIN devices d ON d.id = a.device_id WHERE a.task_id = ? "
                "ORDER BY r.number, d.name",
                (task["id"],),
            ).fetchall()
    cohorts: list[list[str]] = [[] for _ in range(ROUNDS)]
    for number, name in rows:
        cohorts[int(number) - 1].append(str(name))
    return cohorts, weights


def test_a_seeded_run_repeats_its_cohorts_and_its_model(
    tmp_path: Path, sqlite_template: databases.SqliteTemplate, agent_tls: TlsPaths, digits: Any
) -> None:
    first = run_experiment(tmp_path / "a", sqlite_template, agent_tls, digits, selection_seed=5)
    second = run_experiment(tmp_path / "b", sqlite_template, agent_tls, digits, selection_seed=5)
    other = run_experiment(tmp_path / "c", sqlite_template, agent_tls, digits, selection_seed=6)
    assert all(len(c) == PER_ROUND for c in first[0])
    # the rounds do not all pick the same devices (the seed feeds each round's own draw)
    assert len({tuple(c) for c in first[0]}) > 1
    assert first[0] == second[0]
    assert first[1].keys() == second[1].keys()
    for name, values in first[1].items():
        np.testing.assert_array_equal(values, second[1][name])
    # another seed: other cohorts, another model
    assert other[0] != first[0]
    assert any(not np.array_equal(v, other[1][k]) for k, v in first[1].items())
