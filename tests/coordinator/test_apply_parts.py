"""Parts of an aggregation (fedge.coordinator.engine.apply) on real rows and blobs, both
backends: the per-device clip counts a commit adds, and the compressed broadcast a
computation stores (reproducible for a retried aggregation, its sizes those of the blobs)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from sqlalchemy import insert, select, update

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import apply
from fedge.coordinator.models import Device
from fedge.coordinator.runtime import Runtime
from fedge.shared.policy import CompressionPolicy
from tests.coordinator.test_apply_guards import _computed
from tests.support.rounds import EXACT


def _devices(runtime: Runtime, counters: dict[str, int | None]) -> None:
    with session_scope(runtime.sessions) as session:
        for device_id, clipped in counters.items():
            session.execute(
                insert(Device).values(
                    id=device_id,
                    name=device_id,
                    public_key=f"key of {device_id}",
                    status="active",
                    enrolled_at=utcnow(),
                )
            )
            session.execute(
                update(Device).where(Device.id == device_id).values(num_norm_clipped=clipped)
            )


def _clipped(runtime: Runtime) -> dict[str, int | None]:
    with session_scope(runtime.sessions, read_only=True) as session:
        return {d: n for d, n in session.execute(select(Device.id, Device.num_norm_clipped))}


def _count(runtime: Runtime, devices: list[str], scales: tuple[float, ...]) -> None:
    items = tuple(apply.PlannedUpdate(i, "d", 1.0, 0, d) for i, d in enumerate(devices))
    with session_scope(runtime.sessions) as session:
        apply._count_clipped(
            session,
            SimpleNamespace(items=items),  # type: ignore[arg-type]
            SimpleNamespace(scales=scales),  # type: ignore[arg-type]
        )


def test_clip_counts_add_per_device_to_what_was_there(runtime: Runtime) -> None:
    _devices(runtime, {"a": 2, "b": None, "c": 0})
    # a: two of its updates scaled down in one aggregation (a straggler and a fresh one);
    # b: one, on a counter never set; c: scaled by 1.0, which is no clip.
    _count(runtime, ["a", "b", "a", "c"], (0.5, 0.25, 0.999, 1.0))
    assert _clipped(runtime) == {"a": 4, "b": 1, "c": 0}


def test_an_aggregation_without_scales_counts_nothing(runtime: Runtime) -> None:
    """Under differential privacy (or secure aggregation) no per-update scales are known:
    nothing is counted, and nothing fails."""
    _devices(runtime, {"a": 1})
    _count(runtime, ["a", "a"], ())
    _count(runtime, ["a", "a"], (0.5,))  # only what has a scale counts
    assert _clipped(runtime) == {"a": 2}


def test_a_recomputed_broadcast_is_the_same_blobs(runtime: Runtime) -> None:
    """The quantization of the broadcast delta is seeded by (task, version): a retried
    aggregation stores the same delta and model, and the sizes are the blobs' own."""
    _, plan, _ = _computed(runtime, 5, seed=3)
    lossy = CompressionPolicy.from_dict(
        {**EXACT, "download": {"topk_fraction": 0.1, "bits": 8, "chunk": 64}}
    )
    plan = dataclasses.replace(plan, policy=lossy)
    first = apply.compute(plan, runtime.blobs, hook=None).broadcast
    again = apply.compute(plan, runtime.blobs, hook=None).broadcast
    assert first is not None and first == again
    assert first.size == len(runtime.blobs.get(first.digest))
    assert first.delta_size == len(runtime.blobs.get(first.delta_digest))
    assert first.delta_size < first.size  # a tenth of the values, 8 bits each
