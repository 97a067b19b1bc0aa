"""Compressed downloads: devices rebuild the broadcast model from delta chains, bit for bit.

Runs real coordinators (HTTPS in threads, SQLite file or PostgreSQL) on one database and blob
store: rounds are driven by signed devices uploading updates, and after every new version a
random subset of devices catches up from whatever version it holds (skipping versions, so
chains of several deltas), through one replica or the other, with one replica restarted in
the middle. Each rebuilt model must equal the coordinator's stored broadcast model exactly.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
import pytest

from fedge.coordinator.app import create_app
from fedge.coordinator.settings import Settings
from fedge.shared import architectures
from fedge.shared.broadcast import blob_kind, rebuild
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire import decode_model, encode_model
from fedge.shared.wire_delta import WORK_FRAME_MEDIA_TYPE, decode_work_frame
from fedge.shared.wirelayout import KIND_CHAIN, KIND_MODEL
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import (
    EXACT,
    Db,
    TestDevice,
    action,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)
from tests.support.servers import serve_in_thread

MODEL = {"architecture": "softmax", "input_dim": 64, "num_classes": 10}
DOWNLOAD = {"topk_fraction": 0.1, "bits": 8, "chunk": 64}
NUM_ROUNDS = 8


def _wait_assigned(db: Db, task_id: int, devices: Iterable[TestDevice]) -> None:
    """Until each device holds an assignment of the task (the scheduler opens the first round
    after the start, in its own time): a model is served only to a device working on its
    task."""
    want = {d.device_id for d in devices}
    wait_until(lambda: want <= {a.device_id for a in db.assignments(task_id)}, timeout=60)


def _download(device: TestDevice, url: str, task_id: int, version: int, have: int | None) -> bytes:
    device.client.base_url = url
    params = {} if have is None else {"have": have}
    r = device.get(f"{API}/device/tasks/{task_id}/models/{version}", params=params)
    assert r.status_code == 200, r.text
    return r.content


def _broadcast(db: Db, task_id: int, version: int) -> tuple[bytes, Weights]:
    row = db.version(task_id, version)
    assert row is not None
    data = db.blobs.get(row.served_digest)
    return data, decode_model(data)


def _run_round(fleet: list[TestDevice], url: str, db: Db, task_id: int, version: int, rng) -> None:
    """Every device (each test selects the whole fleet, and the round waits for all of them)
    uploads on ``version``; wait for ``version + 1``. The poll waits for the round to open:
    the version before it can be committed a moment before its successor round is."""
    for device in fleet:
        device.client.base_url = url
        work = device.work(wait=20)
        assert work is not None and work["base_version"] == version, work
        body = make_update(work, delta=random_delta(spec_of(work), rng, 0.05), num_examples=5)
        r = device.upload(work, body)
        assert r.status_code == 201, r.text
    wait_until(lambda: db.task(task_id).current_version >= version + 1, timeout=30)


def _replica(stack: ExitStack, settings: Settings) -> str:
    """Another coordinator on the same database and blob store (its own app, scheduler and
    caches: what a second replica, or this one after a restart, starts from)."""
    return stack.enter_context(
        serve_in_thread(create_app(settings), certfile=settings.tls_cert, keyfile=settings.tls_key)
    )


def test_chains_rebuild_the_broadcast_model_bit_for_bit_across_replicas_and_restarts(
    coordinator: Coordinator, settings: Settings, db: Db
) -> None:
    rng = np.random.default_rng(5)
    replica = ExitStack()
    with fleet_of(coordinator, 4) as fleet:
        for device in fleet:  # no connection outlives the replica that is restarted below
            device.client.close()
            device.client = httpx.Client(
                base_url=coordinator.url,
                verify=ssl.create_default_context(cafile=str(coordinator.ca_file)),
                limits=httpx.Limits(max_keepalive_connections=0),
                timeout=30,
            )
        try:
            urls = [coordinator.url, _replica(replica, settings)]
            task_id = create_task(
                coordinator,
                aggregation={
                    "clients_per_round": 4,
                    "over_selection": 0.0,
                    "min_updates": 4,
                    "round_deadline_s": 600,
                    "num_rounds": NUM_ROUNDS,
                },
                compression={**EXACT, "download": DOWNLOAD},
                model=MODEL,
            )
            spec = ModelSpec.from_dict(db.task(task_id).model_spec)
            _wait_assigned(db, task_id, fleet)
            held: dict[str, tuple[int, Weights]] = {}
            for device in fleet:  # everyone starts from the full version 0
                data = _download(device, urls[0], task_id, 0, None)
                held[device.device_id] = (0, decode_model(data, spec=spec))
            chains = longest = 0
            for version in range(NUM_ROUNDS):
                _run_round(fleet, urls[version % 2], db, task_id, version, rng)
                if version == NUM_ROUNDS // 2:  # restart the second replica
                    replica.close()
                    replica = ExitStack()
                    urls = [coordinator.url, _replica(replica, settings)]
                new = version + 1
                served, expected = _broadcast(db, task_id, new)
                for device in fleet:
                    if rng.random() < 0.4 and new < NUM_ROUNDS:
                        continue  # this device skips the version: its next chain is longer
                    have, base = held[device.device_id]
                    data = _download(device, urls[int(rng.integers(2))], task_id, new, have)
                    if blob_kind(data) == KIND_CHAIN:
                        chains += 1
                        longest = max(longest, new - have)
                        weights = rebuild(base, data, spec, task_id=task_id, have=have, want=new)
                    else:
                        assert blob_kind(data) == KIND_MODEL
                        assert data == served
                        weights = decode_model(data, spec=spec)
                    for name in spec.names:
                        assert weights[name].tobytes() == expected[name].tobytes()
                    held[device.device_id] = (new, weights)
        finally:
            replica.close()
    assert chains >= NUM_ROUNDS and longest >= 2  # chains, several of them multi-delta

    # The true model is not what devices got (the download is lossy), but close to it.
    true = db.weights(task_id, NUM_ROUNDS)
    gap = max(float(np.abs(true[n] - expected[n]).max()) for n in spec.names)
    assert 0 < gap < 0.1
    row = db.version(task_id, NUM_ROUNDS)
    assert row is not None and row.broadcast_digest != row.blob_digest
    assert hashlib.sha256(served).hexdigest() == row.broadcast_digest


def test_a_device_new_to_a_task_starts_its_chain_from_the_version_zero_it_generated(
    coordinator: Coordinator, db: Db
) -> None:
    """``have=0&held=<digest>``: a chain when the device's own version 0 is the broadcast one
    (a built-in model's seeded weights), the full model when it is not (uploaded weights)."""
    with fleet_of(coordinator, 1) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={"clients_per_round": 1, "min_updates": 1, "round_deadline_s": 600},
            compression={**EXACT, "download": DOWNLOAD},
            model=MODEL,
        )
        spec = ModelSpec.from_dict(db.task(task_id).model_spec)
        generated = architectures.generated_weights(MODEL)
        assert generated is not None
        _run_round(fleet, coordinator.url, db, task_id, 0, np.random.default_rng(2))
        device = fleet[0]
        path = f"{API}/device/tasks/{task_id}/models/1"
        mine = hashlib.sha256(encode_model(generated)).hexdigest()
        answers = {
            held: device.get(path, params={"have": 0, "held": held})
            for held in (mine[:16], "0" * 16, "xyz")
        }
    chain = answers[mine[:16]]
    assert chain.status_code == 200 and blob_kind(chain.content) == KIND_CHAIN
    served, expected = _broadcast(db, task_id, 1)
    rebuilt = rebuild(generated, chain.content, spec, task_id=task_id, have=0, want=1)
    assert all(rebuilt[n].tobytes() == expected[n].tobytes() for n in spec.names)
    assert len(chain.content) * 2 < len(served)
    full = answers["0" * 16]
    assert full.status_code == 200 and full.content == served
    assert answers["xyz"].status_code == 422
    assert answers["xyz"].json()["error"] == "validation_error"


def test_far_behind_or_without_its_chain_a_device_gets_the_full_model(
    coordinator: Coordinator, db: Db
) -> None:
    """A chain at least as large as the model, or one whose delta blob is gone, is not
    served: the answer is the full broadcast model."""
    rng = np.random.default_rng(9)
    with fleet_of(coordinator, 2) as fleet:
        task_id = create_task(
            coordinator,
            aggregation=every_device(2, rounds=4),
            # every value at 8 bits: a delta is over a quarter of the f32 model, so a chain
            # of four is larger than the model
            compression={**EXACT, "download": {"topk_fraction": 1.0, "bits": 8, "chunk": 64}},
            model=MODEL,
        )
        for version in range(4):
            _run_round(fleet, coordinator.url, db, task_id, version, rng)
        device = fleet[0]
        kinds = {
            have: blob_kind(_download(device, coordinator.url, task_id, 4, have))
            for have in range(4)
        }
        assert kinds[3] == KIND_CHAIN
        assert kinds[0] == KIND_MODEL
        full, _ = _broadcast(db, task_id, 4)
        assert _download(device, coordinator.url, task_id, 4, 0) == full

        row = db.version(task_id, 4)
        assert row is not None and row.delta_digest is not None
        db.blobs.path(row.delta_digest).unlink()
        assert _download(device, coordinator.url, task_id, 4, 3) == full


def test_a_work_answer_leaves_out_the_configuration_the_device_knows(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 1) as fleet:
        create_task(
            coordinator,
            aggregation={"clients_per_round": 1, "min_updates": 1, "round_deadline_s": 600},
            compression={**EXACT, "download": DOWNLOAD},
            model=MODEL,
        )
        device = fleet[0]
        full = device.work(wait=5)
        assert full is not None
        digest = full["config_digest"]
        assert {"compression", "training", "model", "spec"} <= full.keys()

        r = device.get(f"{API}/device/work", params={"wait": 0, "known": digest})
        assert r.status_code == 200, r.text
        thin = r.json()
        assert thin == {
            k: v for k, v in full.items() if k not in ("compression", "training", "model", "spec")
        }
        assert len(r.content) * 2 < len(json.dumps(full))

        other = "0" * 16 if digest != "0" * 16 else "1" * 16
        r = device.get(f"{API}/device/work", params={"wait": 0, "known": other})
        assert r.json() == full
        r = device.get(f"{API}/device/work", params={"wait": 0, "known": "not-a-digest"})
        assert r.status_code == 422 and r.json()["error"] == "validation_error"


def test_a_work_answer_carries_the_chain_to_its_base_model(
    coordinator: Coordinator, db: Db
) -> None:
    rng = np.random.default_rng(3)
    with fleet_of(coordinator, 1) as fleet:
        device = fleet[0]
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 1,
                "over_selection": 0.0,
                "min_updates": 1,
                "round_deadline_s": 600,
                "num_rounds": 3,
            },
            compression={**EXACT, "download": DOWNLOAD},
            model=MODEL,
        )
        spec = ModelSpec.from_dict(db.task(task_id).model_spec)
        _wait_assigned(db, task_id, [device])
        v0 = decode_model(_download(device, coordinator.url, task_id, 0, None), spec=spec)
        _run_round(fleet, coordinator.url, db, task_id, 0, rng)

        r = device.get(f"{API}/device/work", params={"wait": 5, "have": f"{task_id}.0"})
        assert r.status_code == 200
        assert r.headers["content-type"] == WORK_FRAME_MEDIA_TYPE
        answer, chain = decode_work_frame(r.content)
        work = json.loads(answer)
        assert work["base_version"] == 1 and work["model_delta_from"] == 0
        rebuilt = rebuild(v0, chain, spec, task_id=task_id, have=0, want=1)
        _, expected = _broadcast(db, task_id, 1)
        assert all(rebuilt[n].tobytes() == expected[n].tobytes() for n in spec.names)
        (assignment,) = [a for a in db.assignments(task_id) if a.id == work["assignment_id"]]
        assert assignment.status == "downloaded"

        # Nothing to carry: the device holds the base version, another task, or says nothing.
        for have in (f"{task_id}.1", f"{task_id + 1}.0", None):
            params: dict[str, Any] = {"wait": 0}
            if have is not None:
                params["have"] = have
            r = device.get(f"{API}/device/work", params=params)
            assert r.headers["content-type"] == "application/json"
            assert r.json()["assignment_id"] == work["assignment_id"]
        r = device.get(f"{API}/device/work", params={"wait": 0, "have": "1-0"})
        assert r.status_code == 422 and r.json()["error"] == "validation_error"


@pytest.mark.parametrize("download", [DOWNLOAD, None])
@pytest.mark.parametrize("origin", ["generated", "uploaded"])
def test_version_zero_goes_down_at_half_precision_unless_devices_can_generate_it(
    coordinator: Coordinator, db: Db, download: dict[str, Any] | None, origin: str
) -> None:
    """With compressed downloads, an uploaded version 0 is broadcast at float16; a built-in
    model's seeded initial weights are broadcast as they are, with the ETag of the weights a
    device generates from the seed, so that device downloads nothing (304)."""
    compression = {**EXACT} if download is None else {**EXACT, "download": download}
    with fleet_of(coordinator, 1) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={"clients_per_round": 1, "min_updates": 1, "round_deadline_s": 600},
            compression=compression,
            model=MODEL,
            start=False,
        )
        generated = encode_model(architectures.generated_weights(MODEL) or {})
        if origin == "uploaded":
            spec = ModelSpec.from_dict(db.task(task_id).model_spec)
            rng = np.random.default_rng(7)
            weights = {
                t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors
            }
            with coordinator.admin() as admin:
                r = admin.put(f"{API}/tasks/{task_id}/model", content=encode_model(weights))
                assert r.status_code == 200, r.text
        action(coordinator, task_id, "start")
        device = fleet[0]
        assert device.work(wait=5) is not None
        path = f"{API}/device/tasks/{task_id}/models/0"
        etag = f'"{hashlib.sha256(generated).hexdigest()}"'
        confirmed = device.get(path, headers={"If-None-Match": etag})
        served = _download(device, coordinator.url, task_id, 0, None)
    true = db.weights(task_id, 0)
    if origin == "generated":
        assert encode_model(true) == generated
    if download is None or origin == "generated":
        assert served == encode_model(true)
    else:
        assert served == encode_model(true, dtype="f16")
        assert len(served) * 1.9 < len(encode_model(true))
    # The generated weights' ETag answers 304 exactly when they are what is broadcast.
    assert confirmed.status_code == (304 if served == generated else 200)
    assert confirmed.content == (b"" if served == generated else served)
