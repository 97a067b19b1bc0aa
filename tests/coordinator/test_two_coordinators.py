"""Two coordinator processes on one PostgreSQL database and one blob store: devices talk to
both, both schedulers run, and every version is aggregated exactly once.

The task lease is made so short (50 ms, as long as a scheduler tick) that it changes hands
all the time, so both processes really do race for the same rounds; correctness then rests
on the commit-time checks (task row lock, version check, ``accepted`` updates only)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import decode_update
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support.process import coordinator_process
from tests.support.rounds import Db, create_task, fleet_of, make_update, random_delta, spec_of

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

NUM_ROUNDS = 4


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_every_round_is_aggregated_exactly_once(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path, db: Db
) -> None:
    env = {"FEDGE_LEASE_TTL_S": "0.05"}
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                coordinator_process(settings, tmp_path / name, ca_file=tls_paths.ca_cert, env=env)
            )
            for name in ("a", "b")
        ]
        fleet = stack.enter_context(fleet_of(procs[0], 6))
        for i, device in enumerate(fleet):  # half the fleet talks to each process
            device.client.base_url = procs[i % 2].url
        task_id = create_task(
            procs[1],
            aggregation={
                "clients_per_round": 3,
                "over_selection": 0.3,
                "min_updates": 3,
                "round_deadline_s": 600,
                "num_rounds": NUM_ROUNDS,
            },
        )
        rng = np.random.default_rng(21)
        uploaded: set[int] = set()
        deadline = time.monotonic() + 120
        while db.task(task_id).status != "completed":
            assert time.monotonic() < deadline, "the task did not complete"
            for device in fleet:
                work = device.work(wait=0)
                if work is None or work["assignment_id"] in uploaded:
                    continue
                body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=5)
                r = device.upload(work, body)
                if r.status_code == 409:  # the task completed meanwhile
                    assert r.json()["error"] == "task_not_running"
                    continue
                assert r.status_code == 201, r.text
                uploaded.add(work["assignment_id"])
        fleet.close()

        spec = ModelSpec.from_dict(db.task(task_id).model_spec)
        rounds = [r for r in db.rounds(task_id) if r.status == "closed"]
        assert [r.result_version for r in rounds] == list(range(1, NUM_ROUNDS + 1))
        updates = db.updates(task_id)
        applied = [u for u in updates if u.status == "applied"]
        assert {u.assignment_id for u in updates} == uploaded
        for version in range(1, NUM_ROUNDS + 1):
            row = db.version(task_id, version)
            assert row is not None
            mine = [u for u in applied if u.applied_version == version]
            assert row.num_updates == len(mine) >= 3
            # The version is the previous one plus exactly these updates, each counted once.
            deltas = [
                decode_update(db.blobs.get(u.blob_digest), spec=spec).to_dense() for u in mine
            ]
            want = expected_model(
                db.weights(task_id, version - 1), deltas, [u.weight for u in mine]
            )
            assert_weights_equal(db.weights(task_id, version), want)
        # Whatever was not applied is accounted for (refused once the task had completed).
        assert all(u.status in ("applied", "rejected") for u in updates)
