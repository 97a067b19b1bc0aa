"""The secure-aggregation switch and endpoints through the real API (HTTPS, signed device
requests): the task config's refusals, and what each endpoint answers to a message that is
early, repeated, different, malformed, forged or from a device outside the cohort."""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from fedge.coordinator.models import SecAggMember
from fedge.shared.secagg import Grid, RoundConfig, protocol
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import Db, TestDevice, create_task, fleet_of

MODEL = {"architecture": "softmax", "input_dim": 4, "num_classes": 3}
COMPRESSION = {"topk_fraction": 0.5, "bits": 8, "chunk": 64, "error_feedback": True}
BASE = {"clients_per_round": 3, "over_selection": 0.0, "min_updates": 2, "weighting": "equal"}


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"mode": "async"}, "mode 'sync'"),
        ({"weighting": "num_examples"}, "weighting 'equal'"),
        ({"robust": "median"}, "robust 'median'"),
        ({"norm_bound": {"max_norm": 1.0}}, "norm_bound"),
        ({"min_updates": 1}, "min_updates >= 2"),
        ({"clients_per_round": 300, "secure": {"grid_bits": 24}}, "at most 256 devices"),
    ],
)
def test_a_task_that_cannot_run_secure_aggregation_is_refused(
    coordinator: Coordinator, extra: dict[str, Any], words: str
) -> None:
    aggregation = {**BASE, "secure": {}, **extra}
    with coordinator.admin() as admin:
        r = admin.post(
            f"{API}/tasks",
            json={
                "name": "s",
                "model": MODEL,
                "aggregation": aggregation,
                "compression": COMPRESSION,
            },
        )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "validation_error"
    assert words in r.json()["detail"]


def _config(device: TestDevice, round_id: int) -> tuple[RoundConfig, dict[str, Any]]:
    r = device.get(f"{API}/device/secagg/{round_id}/config")
    assert r.status_code == 200, r.text
    info = r.json()
    cfg = RoundConfig(
        task_id=info["task_id"],
        round=info["round"],
        seed=bytes.fromhex(info["seed"]),
        cohort=info["cohort"],
        degree=info["degree"],
        threshold=info["threshold"],
        size=info["size"],
        k=info["k"],
        grid=Grid(bound=info["bound"], bits=info["bits"]),
    )
    return cfg, info


def test_the_endpoints_refuse_what_does_not_fit_the_round(coordinator: Coordinator, db: Db) -> None:
    with fleet_of(coordinator, 4) as fleet:
        aggregation = {**BASE, "secure": {}, "round_deadline_s": 600}
        task_id = create_task(
            coordinator, aggregation=aggregation, compression=COMPRESSION, model=MODEL
        )
        works = {d.device_id: d.work(wait=5) for d in fleet}
        member = next(d for d in fleet if works[d.device_id] is not None)
        outsider = next(d for d in fleet if works[d.device_id] is None)
        work = works[member.device_id]
        assert work is not None and work["secure_aggregation"] is True
        rid = work["round_id"]
        cfg, info = _config(member, rid)
        assert (info["cohort"], info["phase"], info["k"]) == (3, "advert", 8)
        base = f"{API}/device/secagg/{rid}"

        def post(what: str, body: bytes, device: TestDevice = member) -> Any:
            return device.post(
                f"{base}/{what}",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )

        # Not in the cohort; a phase that has not opened.
        assert outsider.get(f"{base}/config").status_code == 404
        r = member.get(f"{base}/adverts")
        assert (r.status_code, r.json()["error"]) == (425, "phase_not_ready")
        assert post("masked", b"x" * 60).status_code == 425
        # Malformed, then forged (signed with another key), then the real advert.
        r = post("advert", b"FSAG" + bytes(10))
        assert (r.status_code, r.json()["error"]) == (400, "truncated")
        index = info["index"]
        secrets = protocol.new_secrets(cfg, index, os.urandom)
        forged = protocol.advertise(cfg, secrets, Ed25519PrivateKey.generate())
        r = post("advert", forged)
        assert (r.status_code, r.json()["error"]) == (422, "bad_signature")
        other_index = (index + 1) % cfg.cohort
        as_other = protocol.advertise(
            cfg, protocol.new_secrets(cfg, other_index, os.urandom), member.key
        )
        r = post("advert", as_other)
        assert (r.status_code, r.json()["error"]) == (422, "unknown_device")
        advert = protocol.advertise(cfg, secrets, member.key)
        assert post("advert", advert).status_code == 201
        assert post("advert", advert).status_code == 200  # the same again: a duplicate
        again = protocol.advertise(cfg, protocol.new_secrets(cfg, index, os.urandom), member.key)
        r = post("advert", again)
        assert (r.status_code, r.json()["error"]) == (409, "message_differs")
        kept = db.read(
            lambda s: s.scalar(
                select(SecAggMember.advert).where(
                    SecAggMember.round_id == rid, SecAggMember.device_id == member.device_id
                )
            )
        )
        assert kept == advert  # nothing of the refused messages was kept
        assert db.updates(task_id) == []
