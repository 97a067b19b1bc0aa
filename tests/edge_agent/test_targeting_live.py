"""Two tasks on one mixed fleet, real agents over HTTPS (see conftest.py): devices holding
digits (64 features) and devices holding wine measurements (13 features).

- The digits task states no requirements, so its first round picks wine devices too: they
  decline at once (``data_mismatch``), the round closes on the digits devices' updates, not at
  its (ten-minute) deadline, and the next round leaves the decliners out.
- The wine task requires the ``wine`` tag (set with the admin CLI) and 13 features: only wine
  devices ever work on it.
- A task requiring a tag no device has says so in its ``status_reason`` and keeps waiting.

Declines and their reasons are read back through the API and the admin CLI.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np
import pytest

from fedge.edge_agent import admin_cli
from fedge.edge_agent.sim.datasets import Dataset, load_dataset
from tests.edge_agent.conftest import LiveCoordinator, shard, wait_for

WINE_MODEL = {"architecture": "softmax", "input_dim": 13, "num_classes": 3, "seed": 0}
DEADLINE_S = 600


@pytest.fixture(scope="module")
def wine() -> Dataset:
    return load_dataset("wine", test_fraction=0.2, rng=np.random.default_rng(1))


def sync(clients: int, *, selected: int, rounds: int) -> dict[str, Any]:
    return {
        "mode": "sync",
        "num_rounds": rounds,
        "clients_per_round": clients,
        "over_selection": selected / clients - 1.0,
        "min_updates": clients,
        "round_deadline_s": DEADLINE_S,
    }


def cli(live: LiveCoordinator, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    common = ["--url", live.url, "--ca", live.ca_file, "--key", live.admin_key]
    assert admin_cli.main([*common, *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_two_tasks_on_a_mixed_fleet_never_wait_for_devices_that_cannot_do_them(
    live: LiveCoordinator, digits: Dataset, wine: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {"digits-0": "digits", "digits-1": "digits", "wine-0": "wine", "wine-1": "wine"}
    ids: dict[str, str] = {}
    for i, (name, kind) in enumerate(names.items()):
        state_dir = live.enroll(name, seed=i + 1)
        data = shard(digits, i) if kind == "digits" else shard(wine, i % 2, size=60)
        # Polls held 5 s: the liveness window (3 polls) stays wide on a loaded machine.
        agent = live.agent(state_dir, data, poll_wait=5.0)
        live.start(agent)
        ids[name] = agent.state.load_config().device_id
    for name, kind in names.items():
        if kind == "wine":
            tagged = cli(live, capsys, "devices", "tag", ids[name], "--add", "wine", "site:lab")
            assert tagged["tags"] == ["site:lab", "wine"]
    assert cli(live, capsys, "devices", "tag", ids["digits-0"])["tags"] == []
    # Every agent reported what it holds before the tasks start.
    for name, kind in names.items():
        caps = wait_for(
            lambda n=name: (
                live.admin.get_device(ids[n])["capabilities_at"]
                and live.admin.get_device(ids[n])["capabilities"]
            ),
            what=f"{name} to report its capabilities",
        )
        assert caps["feature_shape"] == ([64] if kind == "digits" else [13])
        assert caps["trainers"] == ["mlp", "softmax"] and caps["label_kind"] == "class"

    # The digits task picks all four devices in its first round (no requirements) ...
    digits_task = live.create_task(name="digits", aggregation=sync(2, selected=4, rounds=2))
    wine_task = live.create_task(
        name="wine",
        model=WINE_MODEL,
        aggregation=sync(2, selected=2, rounds=2),
        requirements={"tags": ["wine"], "feature_shape": [13], "trainer": "softmax"},
    )
    nobody = live.create_task(
        name="gpu only",
        aggregation=sync(1, selected=1, rounds=1),
        requirements={"tags": ["gpu"]},
    )
    for task in (digits_task, wine_task):
        wait_for(
            lambda t=task["id"]: live.task(t)["status"] == "completed",
            timeout=120,
            what=f"task {task['name']} to complete",
        )
        for rnd in live.rounds(task["id"]):
            # Every round closed on its updates, long before its deadline.
            assert rnd["status"] == "closed" and rnd["num_received"] == 2, rnd
            assert at(rnd["closed_at"]) < at(rnd["deadline_at"]), rnd
            assert rnd["num_dropped"] == 0, rnd

    # ... the wine devices declined it at once, with their reason (also when the round had
    # reached its target and cancelled their work first), and are left out of rounds opened
    # after their decline: the second round's work went to the digits devices alone (it can
    # have opened before a slow decline arrived, and then that device declined it as well).
    first, second = live.rounds(digits_task["id"])
    assert (first["num_assigned"], first["num_declined"]) == (4, 2)
    assert second["num_assigned"] - second["num_declined"] == 2
    declines = cli(live, capsys, "rounds", "declines", str(digits_task["id"]), "1")
    assert declines["total"] == 2
    assert {d["device_id"] for d in declines["items"]} == {ids["wine-0"], ids["wine-1"]}
    for decline in declines["items"]:
        assert decline["reason"] == "data_mismatch"
        assert "[n, 64]" in decline["detail"] and "13" in decline["detail"]
    per_device = cli(live, capsys, "devices", "declines", ids["wine-0"])
    assert sorted(d["round_number"] for d in per_device["items"])[0] == 1
    assert live.admin.list_device_declines(ids["digits-0"])["total"] == 0
    assert live.admin.get_device(ids["wine-0"])["num_declined"] == per_device["total"]

    # Only wine devices worked on the wine task; nobody declined it.
    for rnd in live.rounds(wine_task["id"]):
        assert rnd["num_declined"] == 0 and rnd["num_assigned"] == 2
        assert live.admin.list_round_declines(wine_task["id"], rnd["number"])["total"] == 0

    # The task nobody can work on says so, and keeps running for devices to come.
    waiting = live.task(nobody["id"])
    assert waiting["status"] == "running"
    assert waiting["status_reason"].startswith(
        "waiting for eligible devices: 0 of the 1 needed are live, idle and meet the "
        "requirements (tags gpu)"
    )
    assert live.rounds(nobody["id"]) == []

    # Tag editing from the command line: remove, replace; refusals reach the user.
    wine0 = ids["wine-0"]
    assert cli(live, capsys, "devices", "tag", wine0, "--remove", "site:lab")["tags"] == ["wine"]
    assert cli(live, capsys, "devices", "tag", wine0, "--set", "b", "a")["tags"] == ["a", "b"]
    assert live.admin.get_device(wine0)["tags"] == ["a", "b"]
    common = ["--url", live.url, "--ca", live.ca_file, "--key", live.admin_key]
    capsys.readouterr()
    assert admin_cli.main([*common, "devices", "tag", wine0, "--add", "no spaces"]) == 1
    assert "validation_error" in capsys.readouterr().err
