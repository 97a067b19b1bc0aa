"""Differential privacy through the admin API over real HTTPS, both backends: a central-DP task
runs rounds with signed devices until its epsilon budget stops it; the task view and the admin
CLI report the epsilon spent, and a coordinator restarted on the same database and blob store
reports the same. A local-DP task hands its settings to devices in the work answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedge.coordinator.app import create_app
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.edge_agent import admin_cli
from tests.coordinator.conftest import Coordinator, make_key
from tests.support.device import API
from tests.support.rounds import Db, create_task, fleet_of, make_update, random_delta, spec_of
from tests.support.servers import serve_in_thread

DOC_ORDERS = [*range(2, 65), 80, 96, 128, 192, 256, 512, 1024]


@contextmanager
def running(
    settings: Settings, tls_paths: TlsPaths, keys: tuple[str, str]
) -> Iterator[Coordinator]:
    """A coordinator process's worth of app (scheduler included) served over HTTPS."""
    app = create_app(settings)
    with serve_in_thread(app, certfile=settings.tls_cert, keyfile=settings.tls_key) as url:
        yield Coordinator(url, settings, app, tls_paths.ca_cert, *keys)


def _epsilon(q: float, z: float, n: int, delta: float) -> float:
    accountant = rdp.RdpAccountant(DOC_ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return float(accountant.get_epsilon(delta))


def _cli(server: Coordinator, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    argv = ["--url", server.url, "--ca", str(server.ca_file), "--key", server.admin_key, *args]
    assert admin_cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_budget_stop_reported_by_api_and_cli_and_kept_across_a_restart(
    settings: Settings, tls_paths: TlsPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    z, delta = 1.2, 1e-4
    # Four devices, two picked per round: q = 0.5. The budget fits two rounds, not three.
    after2, after3 = _epsilon(0.5, z, 2, delta), _epsilon(0.5, z, 3, delta)
    target = (after2 + after3) / 2
    keys = (make_key(settings, "admin"), make_key(settings, "viewer"))
    db = Db(settings)
    rng = np.random.default_rng(21)
    try:
        with running(settings, tls_paths, keys) as server, fleet_of(server, 4) as fleet:
            task_id = create_task(
                server,
                aggregation={
                    "clients_per_round": 2,
                    "over_selection": 0.0,
                    "min_updates": 2,
                    "round_deadline_s": 600,
                    "num_rounds": 10,
                    "weighting": "equal",
                    "max_staleness": 0,
                    "privacy": {
                        "mode": "central",
                        "clip_norm": 0.5,
                        "noise_multiplier": z,
                        "delta": delta,
                        "target_epsilon": target,
                    },
                },
            )
            for number in (1, 2):
                db.wait_round(task_id, number)
                works = [(d, d.work(wait=0)) for d in fleet]
                picked = [(d, w) for d, w in works if w is not None]
                assert len(picked) == 2
                for device, work in picked:
                    body = make_update(
                        work, delta=random_delta(spec_of(work), rng, scale=1.0), num_examples=5
                    )
                    assert device.upload(work, body).status_code in (200, 201)
            task = db.wait_task(task_id, lambda t: t.status == "completed")
            assert task.current_version == 2
            assert task.status_reason is not None
            assert task.status_reason.startswith("privacy budget")
            with server.viewer() as viewer:
                view = viewer.get(f"{API}/tasks/{task_id}").json()
            assert view["privacy"]["mode"] == "central"
            assert view["privacy"]["rounds_accounted"] == 2
            assert view["privacy"]["epsilon"] == pytest.approx(after2, rel=1e-9)
            assert view["privacy"]["delta"] == delta
            assert view["privacy"]["target_epsilon"] == target
            assert _cli(server, capsys, "tasks", "privacy", str(task_id)) == view["privacy"]
        # A new coordinator on the same database and blob store: the ledger was persisted.
        with running(settings, tls_paths, keys) as again:
            with again.admin() as admin:
                restarted = admin.get(f"{API}/tasks/{task_id}").json()
            assert restarted["privacy"] == view["privacy"]
            assert restarted["status_reason"] == view["status_reason"]
    finally:
        db.close()


def test_invalid_privacy_config_is_a_422_that_changes_nothing(coordinator: Coordinator) -> None:
    with coordinator.admin() as admin:
        before = admin.get(f"{API}/tasks").json()
        r = admin.post(
            f"{API}/tasks",
            json={
                "name": "dp",
                "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3},
                "aggregation": {
                    "privacy": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}
                },
            },
        )
        assert r.status_code == 422
        assert r.json()["error"] == "validation_error"
        assert "weighting 'equal'" in r.json()["detail"]
        assert admin.get(f"{API}/tasks").json() == before


def test_local_dp_settings_reach_devices_through_the_work_answer(coordinator: Coordinator) -> None:
    with fleet_of(coordinator, 1) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 1,
                "over_selection": 0.0,
                "num_rounds": 1,
                "privacy": {"mode": "local", "clip_norm": 0.8, "noise_multiplier": 1.5},
            },
        )
        work = fleet[0].work(wait=10)
        assert work is not None and work["task_id"] == task_id
        assert work["training"]["local_dp"] == {"clip_norm": 0.8, "noise_multiplier": 1.5}
        with coordinator.viewer() as viewer:
            view = viewer.get(f"{API}/tasks/{task_id}").json()
        assert view["privacy"]["mode"] == "local"
        assert view["privacy"]["verified"] is False
        # Noise std 1.5 * clip on a sensitivity of 2 * clip: a Gaussian mechanism of noise
        # multiplier 0.75.
        accountant = rdp.RdpAccountant(DOC_ORDERS)
        accountant.compose(dp_accounting.GaussianDpEvent(0.75))
        expected = accountant.get_epsilon(view["privacy"]["delta"])
        assert view["privacy"]["epsilon_per_round"] == pytest.approx(expected, rel=1e-9)


def test_changing_a_draft_sets_and_clears_the_devices_local_dp(coordinator: Coordinator) -> None:
    task_id = create_task(
        coordinator, aggregation={"clients_per_round": 1, "num_rounds": 1}, start=False
    )
    local = {"mode": "local", "clip_norm": 2.0, "noise_multiplier": 0.5}
    with coordinator.admin() as admin:
        r = admin.patch(f"{API}/tasks/{task_id}", json={"aggregation": {"privacy": local}})
        assert r.status_code == 200, r.text
        assert r.json()["training"]["local_dp"] == {"clip_norm": 2.0, "noise_multiplier": 0.5}
        # A value sent in training is replaced by the one aggregation.privacy implies.
        r = admin.patch(
            f"{API}/tasks/{task_id}",
            json={"training": {"local_dp": {"clip_norm": 9.0, "noise_multiplier": 9.0}}},
        )
        assert r.json()["training"]["local_dp"] == {"clip_norm": 2.0, "noise_multiplier": 0.5}
        r = admin.patch(f"{API}/tasks/{task_id}", json={"aggregation": {"privacy": None}})
        assert r.status_code == 200, r.text
        assert r.json()["training"]["local_dp"] is None
        assert r.json()["privacy"] is None
