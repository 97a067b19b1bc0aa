"""Round-engine set-up on a :class:`~fedge.coordinator.runtime.Runtime` without HTTP: devices
enrolled in the database and a running task whose first round holds real uploads and is
``aggregating``, ready for :func:`fedge.coordinator.engine.apply.plan_aggregation`."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.updates import accept_upload
from fedge.coordinator.enrollment import create_token, enroll_device
from fedge.coordinator.models import Assignment, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.tasks import TaskCreate
from fedge.coordinator.tasks import create_task, transition
from fedge.shared.compression import compress
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.signing import public_key_to_b64
from fedge.shared.wire import encode_update
from tests.support.rounds import EXACT, SMALL_MODEL


class Uploaded(NamedTuple):
    """One accepted upload of the first round: its update id, delta and ``num_examples``."""

    update_id: int
    delta: Weights
    num_examples: int


def enroll_seen(runtime: Runtime, n: int, *, prefix: str = "d") -> None:
    """``n`` active devices (fresh keys, named ``{prefix}{i}``), each seen just now."""
    with session_scope(runtime.sessions) as session:
        _, secret = create_token(session, label="t", max_uses=n, expires_in_s=600)
        for i in range(n):
            key = public_key_to_b64(Ed25519PrivateKey.generate().public_key())
            device, _ = enroll_device(
                session, token=secret, public_key=key, name=f"{prefix}{i}", capabilities={}
            )
            device.last_seen_at = utcnow()


def first_round_with_uploads(
    runtime: Runtime,
    rng: np.random.Generator,
    *,
    n: int,
    model: Mapping[str, Any] = SMALL_MODEL,
    aggregation: Mapping[str, Any] | None = None,
    scale: float = 1.0,
    num_examples: Callable[[int], int] = lambda i: 10,
    prefix: str = "d",
) -> tuple[int, list[Uploaded]]:
    """A started task (lossless compression) whose first sync round selected ``n`` freshly
    enrolled devices, each of which uploaded ``scale`` x a standard-normal delta with
    ``num_examples(i)`` examples; the round is closed (``aggregating``). The task id and the
    uploads in upload order."""
    enroll_seen(runtime, n, prefix=prefix)
    body = TaskCreate.model_validate(
        {
            "name": f"t-{secrets.token_hex(3)}",
            "model": dict(model),
            "aggregation": {
                "clients_per_round": n,
                "over_selection": 0.0,
                "num_rounds": 1,
                **(aggregation or {}),
            },
            "compression": EXACT,
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.1},
        }
    )
    with session_scope(runtime.sessions) as session:
        task = create_task(session, runtime.blobs, runtime.settings, body)
        transition(session, task, "start")
        task_id = task.id
        cfg = AggregationConfig.from_dict(task.aggregation)
        rnd, assigned = rounds.open_sync_round(
            session, task, cfg, now=utcnow(), liveness=Liveness(default_poll_s=20.0)
        )
        assert rnd is not None and len(assigned) == n
        spec = ModelSpec.from_dict(task.model_spec)
        work = [
            (a.id, a.device_id)
            for a in session.scalars(select(Assignment).where(Assignment.round_id == rnd.id))
        ]
    policy = CompressionPolicy.from_dict(EXACT)
    uploaded: list[Uploaded] = []
    for i, (assignment_id, device_id) in enumerate(work):
        delta = {
            t.name: (scale * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.tensors
        }
        examples = num_examples(i)
        data = encode_update(
            compress(delta, policy, rng), task_id=task_id, base_version=0, num_examples=examples
        )
        accept_upload(
            runtime,
            device_id=device_id,
            assignment_id=assignment_id,
            key=f"k-{prefix}{i}",
            body=data,
        )
        with session_scope(runtime.sessions) as session:
            update_id = session.scalar(
                select(Update.id).where(Update.assignment_id == assignment_id)
            )
        assert update_id is not None
        uploaded.append(Uploaded(update_id, delta, examples))
    with session_scope(runtime.sessions) as session:
        current = session.get(Task, task_id)
        rnd = rounds.active_round(session, task_id)
        assert current is not None and rnd is not None
        rounds.close_sync_round_if_due(session, current, rnd, cfg, now=utcnow())
        assert rnd.status == "aggregating"
    return task_id, uploaded
