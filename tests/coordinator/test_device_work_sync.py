"""Sync rounds end to end: real signed devices over HTTPS against a running coordinator."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest

from fedge.coordinator.engine.strategies import state_from_bytes
from fedge.coordinator.models import Task
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire import decode_model
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    Db,
    Fleet,
    create_task,
    decoded_delta,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)


def expected_model(w0: Weights, deltas: Sequence[Weights], weights: Sequence[float]) -> Weights:
    """w0 + sum(w_i * d_i) / sum(w_i), computed independently of the coordinator."""
    total = float(sum(weights))
    return {
        name: (
            w0[name].astype(np.float64)
            + sum(w * d[name].astype(np.float64) for w, d in zip(weights, deltas, strict=True))
            / total
        ).astype(np.float32)
        for name in w0
    }


def _at_version(version: int, task: Task) -> bool:
    return task.current_version == version


def assert_weights_equal(got: Weights, want: Weights) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_round_closes_at_deadline_with_quorum_when_30_percent_drop(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 10) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 10,
                "over_selection": 0.0,
                "min_updates": 5,
                "round_deadline_s": 3.0,
                "num_rounds": 5,
            },
        )
        works = {d.device_id: d.work(wait=10) for d in fleet}
        assert all(w is not None and w["base_version"] == 0 for w in works.values())
        assert len({w["assignment_id"] for w in works.values() if w}) == 10
        spec = spec_of(next(iter(works.values())))  # type: ignore[arg-type]
        rng = np.random.default_rng(1)
        uploaders, droppers = fleet[:7], fleet[7:]
        deltas, counts = [], []
        for i, device in enumerate(uploaders):
            work = works[device.device_id]
            assert work is not None
            body = make_update(work, delta=random_delta(spec, rng), num_examples=10 + 5 * i)
            r = device.upload(work, body)
            assert r.status_code == 201, r.text
            assert r.json()["staleness"] == 0
            deltas.append(decoded_delta(body, spec))
            counts.append(10 + 5 * i)

        rnd = db.wait_round(task_id, 1, closed=True)
        assert rnd.status == "closed"
        assert (rnd.num_assigned, rnd.num_received, rnd.num_dropped) == (10, 7, 3)
        assert rnd.result_version == 1
        assert_weights_equal(
            db.weights(task_id, 1), expected_model(db.weights(task_id, 0), deltas, counts)
        )
        assert all(u.status == "applied" and u.applied_version == 1 for u in db.updates(task_id))

        # Reliability statistics: the three that did not upload were dropped.
        for device in droppers:
            assert db.device(device.device_id).num_dropped == 1
            work = works[device.device_id]
            assert work is not None
            stopped = device.work(wait=0, current=work["assignment_id"])
            assert stopped is not None and stopped["status"] == "cancelled"
        for device in uploaders:
            stats = db.device(device.device_id)
            assert (stats.num_completed, stats.num_dropped) == (1, 0)
        # The next round is open on the new version.
        nxt = db.wait_round(task_id, 2)
        assert nxt.base_version == 1


def test_below_quorum_the_round_fails_and_a_new_one_opens(coordinator: Coordinator, db: Db) -> None:
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 3,
                "over_selection": 0.0,
                "min_updates": 3,
                "round_deadline_s": 1.5,
            },
        )
        works = [d.work(wait=10) for d in fleet]
        assert all(w is not None for w in works)
        spec = spec_of(works[0])  # type: ignore[arg-type]
        rng = np.random.default_rng(2)
        for device, work in zip(fleet[:2], works[:2], strict=True):
            assert work is not None
            body = make_update(work, delta=random_delta(spec, rng), num_examples=20)
            assert device.upload(work, body).status_code == 201

        first = db.wait_round(task_id, 1, closed=True)
        assert first.status == "failed"
        assert "2 of the 3" in (first.status_reason or "")
        assert first.num_dropped == 1
        second = db.wait_round(task_id, 2)
        assert (second.status, second.base_version) == ("open", 0)
        # Nothing was aggregated; the two updates wait, still on the current version.
        assert db.task(task_id).current_version == 0
        assert [u.status for u in db.updates(task_id)] == ["accepted", "accepted"]
        # They count for the new round, which gets its assignments.
        assert second.num_received == 2
        assert second.num_assigned == 3
        assert fleet[2].work(wait=5) is not None


@dataclass
class LateScenario:
    fleet: Fleet
    task_id: int
    works: list[dict[str, Any]]
    bodies: list[bytes]
    spec: ModelSpec


@contextmanager
def late_update_scenario(
    coordinator: Coordinator, db: Db, *, max_staleness: int
) -> Iterator[LateScenario]:
    """Round 1 selects 3 devices for a target of 2; two upload and version 1 is built; the
    third device still holds an update on version 0."""
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 2,
                "over_selection": 0.5,
                "min_updates": 2,
                "round_deadline_s": 60,
                "max_staleness": max_staleness,
                "staleness": {"function": "polynomial", "a": 0.5},
            },
        )
        works = [d.work(wait=10) for d in fleet]
        assert all(w is not None for w in works)
        spec = spec_of(works[0])  # type: ignore[arg-type]
        rng = np.random.default_rng(3)
        bodies = [
            make_update(w, delta=random_delta(spec, rng), num_examples=10 * (i + 1))  # type: ignore[arg-type]
            for i, w in enumerate(works)
        ]
        for i in (0, 1):
            assert fleet[i].upload(works[i], bodies[i]).status_code == 201  # type: ignore[arg-type]
        wait_until(lambda: db.task(task_id).current_version == 1)
        yield LateScenario(fleet, task_id, works, bodies, spec)  # type: ignore[arg-type]


def test_a_late_update_enters_the_next_version_with_its_staleness_weight(
    coordinator: Coordinator, db: Db
) -> None:
    with late_update_scenario(coordinator, db, max_staleness=2) as sc:
        fleet, task_id, works, bodies, spec = sc.fleet, sc.task_id, sc.works, sc.bodies, sc.spec
        straggler = works[2]
        assert straggler is not None
        # Round 1 closed on its target: the straggler was cancelled, not counted as dropped.
        assert db.round(task_id, 1).num_dropped == 0  # type: ignore[union-attr]
        assert fleet[2].work(current=straggler["assignment_id"])["status"] == "cancelled"  # type: ignore[index]
        r = fleet[2].upload(straggler, bodies[2])
        assert r.status_code == 201, r.text
        late = r.json()
        # tau = 1, weight = 30 * (1 + 1) ** -0.5
        assert late["staleness"] == 1
        assert late["weight"] == pytest.approx(30 / np.sqrt(2))

        # Round 2 (on version 1): two fresh updates close it; the late one rides along.
        rnd2 = db.wait_round(task_id, 2)
        assert rnd2.base_version == 1
        fresh_works = [d.work(wait=10) for d in fleet[:2]]
        rng = np.random.default_rng(4)
        fresh = []
        for device, work in zip(fleet[:2], fresh_works, strict=True):
            assert work is not None and work["base_version"] == 1
            body = make_update(work, delta=random_delta(spec, rng), num_examples=40)
            assert device.upload(work, body).status_code == 201
            fresh.append(decoded_delta(body, spec))
        wait_until(lambda: db.task(task_id).current_version == 2)

        want = expected_model(
            db.weights(task_id, 1),
            [*fresh, decoded_delta(bodies[2], spec)],
            [40.0, 40.0, 30 / np.sqrt(2)],
        )
        assert_weights_equal(db.weights(task_id, 2), want)
        by_assignment = {u.assignment_id: u for u in db.updates(task_id)}
        applied = by_assignment[straggler["assignment_id"]]
        assert (applied.status, applied.applied_version, applied.staleness) == ("applied", 2, 1)
        assert applied.weight == pytest.approx(30 / np.sqrt(2))
        closed2 = db.round(task_id, 2)
        assert closed2 is not None and (closed2.num_received, closed2.num_stale) == (3, 1)
        # A late delivery is not a dropout.
        assert db.device(fleet[2].device_id).num_completed == 1


def test_an_update_beyond_max_staleness_is_refused_and_nothing_is_stored(
    coordinator: Coordinator, db: Db
) -> None:
    with late_update_scenario(coordinator, db, max_staleness=0) as sc:
        fleet, task_id, works, bodies = sc.fleet, sc.task_id, sc.works, sc.bodies
        before = len(db.updates(task_id))
        r = fleet[2].upload(works[2], bodies[2])
        assert r.status_code == 409
        assert r.json()["error"] == "stale_update"
        assert "max_staleness" in r.json()["detail"] or "at most 0" in r.json()["detail"]
        assert len(db.updates(task_id)) == before
        assert not db.blobs.exists(hashlib.sha256(bodies[2]).hexdigest())


def test_the_task_completes_after_num_rounds_and_the_final_model_is_downloadable(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 1,
                "over_selection": 1.0,
                "min_updates": 1,
                "round_deadline_s": 600,
                "num_rounds": 2,
            },
        )
        rng = np.random.default_rng(6)
        for version in (0, 1):
            works = [d.work(wait=10) for d in fleet]
            assert all(w is not None and w["base_version"] == version for w in works)
            first = works[0]
            assert first is not None
            body = make_update(first, delta=random_delta(spec_of(first), rng), num_examples=8)
            assert fleet[0].upload(first, body).status_code == 201
            db.wait_task(task_id, partial(_at_version, version + 1))
        task = db.wait_task(task_id, lambda t: t.status == "completed")
        assert task.finished_at is not None
        # The other device's assignment of the last round is cancelled, its update refused.
        last = works[1]
        assert last is not None
        assert fleet[1].work(current=last["assignment_id"])["status"] == "cancelled"  # type: ignore[index]
        body = make_update(last, delta=random_delta(spec_of(last), rng), num_examples=8)
        r = fleet[1].upload(last, body)
        assert (r.status_code, r.json()["error"]) == (409, "task_not_running")
        assert [r.status for r in db.rounds(task_id)] == ["closed", "closed"]
        with coordinator.admin() as admin:
            final = admin.get(f"{API}/tasks/{task_id}/models/latest")
        assert final.status_code == 200
        assert_weights_equal(decode_model(final.content), db.weights(task_id, 2))


def test_server_momentum_is_persisted_between_versions(coordinator: Coordinator, db: Db) -> None:
    with fleet_of(coordinator, 1) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "strategy": "fedavgm",
                "server_momentum": 0.5,
                "server_lr": 1.0,
                "clients_per_round": 1,
                "over_selection": 0.0,
                "min_updates": 1,
                "num_rounds": 2,
            },
        )
        rng = np.random.default_rng(12)
        deltas = []
        for version in (0, 1):
            work = fleet[0].work(wait=10)
            assert work is not None and work["base_version"] == version
            body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=9)
            assert fleet[0].upload(work, body).status_code == 201
            deltas.append(decoded_delta(body, spec_of(work)))
            db.wait_task(task_id, partial(_at_version, version + 1))
        w0, w1, w2 = (db.weights(task_id, v) for v in (0, 1, 2))
        # m1 = d1, w1 = w0 + m1; m2 = 0.5 * m1 + d2, w2 = w1 + m2
        m2 = {n: 0.5 * deltas[0][n].astype(np.float64) + deltas[1][n] for n in w0}
        assert_weights_equal(w1, expected_model(w0, [deltas[0]], [1.0]))
        assert_weights_equal(w2, {n: (w1[n] + m2[n]).astype(np.float32) for n in w0})
        # The momentum buffer lives in the blob store, referenced by the task.
        digest = db.task(task_id).optimizer_state_digest
        assert digest is not None
        state = state_from_bytes(db.blobs.get(digest))
        for name in w0:
            np.testing.assert_allclose(state[f"m/{name}"], m2[name], rtol=1e-12)
