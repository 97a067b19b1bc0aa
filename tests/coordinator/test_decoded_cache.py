"""Updates decoded at upload are aggregated from memory (each decoded once, not twice), with
the blob store as the fallback; the result is the same model either way.

Unit tests of the byte-bounded cache, and an engine test that steps an async task with the
cache on and off (the scheduler is disabled, the test steps the engine)."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.engine.decodedcache import DecodedCache, decoded_size
from fedge.coordinator.engine.scheduler import TaskStepper
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.shared.compression import compress
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import DecodedUpdate, decode_update, encode_update
from tests.coordinator.conftest import Coordinator
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support.rounds import (
    Db,
    create_task,
    decoded_delta,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
)

SPEC = ModelSpec.from_dict([{"name": "w", "shape": [100, 10]}, {"name": "b", "shape": [10]}])
POLICY = CompressionPolicy.from_dict({"topk_fraction": 0.1, "bits": 8})


def _decoded(seed: int, policy: CompressionPolicy = POLICY) -> DecodedUpdate:
    rng = np.random.default_rng(seed)
    delta = {t.name: rng.normal(size=t.shape).astype(np.float32) for t in SPEC.tensors}
    body = encode_update(
        compress(delta, policy, rng=rng), task_id=1, base_version=0, num_examples=5
    )
    return decode_update(body, spec=SPEC, policy=policy)


def test_an_entry_is_taken_once_and_only_for_its_spec_and_policy() -> None:
    cache = DecodedCache(10_000_000)
    update = _decoded(0)
    cache.put("a" * 64, update, spec=SPEC, policy=POLICY)
    assert cache.bytes == decoded_size(update) > 0
    assert cache.take("a" * 64, spec=SPEC, policy=POLICY) is update
    assert cache.take("a" * 64, spec=SPEC, policy=POLICY) is None  # used: gone
    assert (cache.hits, cache.misses, cache.bytes, len(cache)) == (1, 1, 0, 0)

    other = CompressionPolicy.from_dict({"topk_fraction": 0.2, "bits": 8})
    cache.put("b" * 64, update, spec=SPEC, policy=POLICY)
    assert cache.take("b" * 64, spec=SPEC, policy=other) is None
    assert len(cache) == 0  # a mismatch drops the entry too: the blob is decoded instead


def test_the_cache_keeps_within_its_bytes_oldest_out_first() -> None:
    updates = [_decoded(seed) for seed in range(5)]
    size = decoded_size(updates[0])
    cache = DecodedCache(3 * size)
    for i, update in enumerate(updates):
        cache.put(f"{i:064x}", update, spec=SPEC, policy=POLICY)
        assert cache.bytes <= 3 * size
    assert len(cache) == 3
    assert [cache.take(f"{i:064x}", spec=SPEC, policy=POLICY) is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    DecodedCache(0).put("c" * 64, updates[0], spec=SPEC, policy=POLICY)  # disabled: no error


@pytest.fixture(params=[64.0, 0.0], ids=["cache", "no-cache"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    return settings.model_copy(
        update={"scheduler_enabled": False, "decoded_cache_mb": request.param}
    )


def test_aggregation_takes_what_the_upload_decoded_and_gets_the_same_model(
    coordinator: Coordinator, db: Db, settings: Settings
) -> None:
    runtime: Runtime = coordinator.app.state.runtime
    stepper = TaskStepper(runtime)
    rng = np.random.default_rng(7)
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={"mode": "async", "buffer_size": 3, "max_concurrency": 3},
        )
        stepper.step(task_id)
        works = [d.work() for d in fleet]
        bodies = []
        for i, (device, work) in enumerate(zip(fleet, works, strict=True)):
            assert work is not None
            body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=10 + i)
            assert device.upload(work, body).status_code == 201
            bodies.append(body)
        cached = len(runtime.decoded)
        stepper.step(task_id)
        assert db.task(task_id).current_version == 1
        spec = spec_of(works[0])  # type: ignore[arg-type]
        assert_weights_equal(
            db.weights(task_id, 1),
            expected_model(
                db.weights(task_id, 0), [decoded_delta(b, spec) for b in bodies], [10, 11, 12]
            ),
        )
    if settings.decoded_cache_mb > 0:
        assert (cached, runtime.decoded.hits, len(runtime.decoded)) == (3, 3, 0)
    else:
        assert (cached, runtime.decoded.hits) == (0, 0)
