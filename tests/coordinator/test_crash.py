"""A coordinator process killed with SIGKILL loses no accepted update and applies each one
exactly once after a restart.

Two kill points:

- ``mid_aggregation``: the round is closed and being aggregated (the new model blob may
  already be written, nothing committed). The first process runs an evaluation hook that
  signals the test and then hangs, so the test can kill it at exactly that moment.
- ``round_open``: updates are accepted but the round has not reached its target yet; the last
  update arrives at the restarted process.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import decode_update
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support.process import CoordinatorProcess, coordinator_process
from tests.support.rounds import (
    Db,
    create_task,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)

pytestmark = pytest.mark.slow

MARKER_ENV = "FEDGE_TEST_CRASH_MARKER"


def hang_in_aggregation(model_config: dict, weights: dict) -> dict:
    """Evaluation hook of the first process: say "aggregating now", then never return."""
    marker = Path(os.environ[MARKER_ENV])
    marker.write_text("aggregating")
    threading.Event().wait()
    return {}


def _process(
    settings: Settings, tls_paths: TlsPaths, workdir: Path, **env: str
) -> AbstractContextManager[CoordinatorProcess]:
    # A short lease: the restarted process (another instance id) takes the task over soon.
    return coordinator_process(
        settings, workdir, ca_file=tls_paths.ca_cert, env={"FEDGE_LEASE_TTL_S": "1", **env}
    )


def _stored_aggregate(db: Db, task_id: int, spec: ModelSpec) -> dict:
    """w0 + sum(n_i * delta_i) / sum(n_i) from the update blobs as stored."""
    updates = db.updates(task_id)
    deltas = [decode_update(db.blobs.get(u.blob_digest), spec=spec).to_dense() for u in updates]
    return expected_model(db.weights(task_id, 0), deltas, [u.num_examples for u in updates])


@pytest.mark.parametrize("kill_point", ["mid_aggregation", "round_open"])
def test_a_killed_coordinator_resumes_and_applies_every_update_once(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db, kill_point: str
) -> None:
    marker = tmp_path / "aggregating"
    hang = {"FEDGE_EVAL_HOOK": f"{__name__}:hang_in_aggregation", MARKER_ENV: str(marker)}
    uploaders = 3 if kill_point == "mid_aggregation" else 2
    with ExitStack() as stack:
        first_env = hang if kill_point == "mid_aggregation" else {}
        first = stack.enter_context(_process(settings, tls_paths, tmp_path / "1", **first_env))
        fleet = stack.enter_context(fleet_of(first, 3))
        task_id = create_task(
            first,
            aggregation={
                "clients_per_round": 3,
                "over_selection": 0.0,
                "min_updates": 3,
                "round_deadline_s": 600,
                "num_rounds": 3,
            },
        )
        works = [d.work(wait=20) for d in fleet]
        assert all(w is not None for w in works)
        spec = spec_of(works[0])  # type: ignore[arg-type]
        rng = np.random.default_rng(11)
        bodies = [
            make_update(w, delta=random_delta(spec, rng), num_examples=7 * (i + 1))  # type: ignore[arg-type]
            for i, w in enumerate(works)
        ]
        for i in range(uploaders):
            r = fleet[i].upload(works[i], bodies[i])  # type: ignore[arg-type]
            assert r.status_code == 201, r.text
        if kill_point == "mid_aggregation":
            wait_until(marker.exists, timeout=30)
        first.kill()

        # What the killed process left: every accepted update, nothing applied.
        expected_round_status = "aggregating" if kill_point == "mid_aggregation" else "open"
        assert db.round(task_id, 1).status == expected_round_status  # type: ignore[union-attr]
        assert db.task(task_id).current_version == 0
        assert db.version(task_id, 1) is None
        assert [u.status for u in db.updates(task_id)] == ["accepted"] * uploaders

        second = stack.enter_context(_process(settings, tls_paths, tmp_path / "2"))
        for device in fleet:  # the devices now talk to the restarted coordinator
            device.client.base_url = second.url
        if kill_point == "round_open":
            r = fleet[2].upload(works[2], bodies[2])  # type: ignore[arg-type]
            assert r.status_code == 201, r.text
        wait_until(lambda: db.task(task_id).current_version == 1, timeout=60)
        updates = db.updates(task_id)
        assert len(updates) == 3
        assert all(u.status == "applied" and u.applied_version == 1 for u in updates)
        assert db.round(task_id, 1).status == "closed"  # type: ignore[union-attr]
        assert_weights_equal(db.weights(task_id, 1), _stored_aggregate(db, task_id, spec))
        # The task goes on: the next round opens on version 1.
        nxt = db.wait_round(task_id, 2)
        assert nxt.base_version == 1
        fleet.close()  # before the server stops, so it has no connections to drain
