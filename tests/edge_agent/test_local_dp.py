"""Local differential privacy on the device: the update step clips the delta and adds Gaussian
noise of std ``noise_multiplier * clip_norm`` before compression, so the body that leaves the
device (decoded exactly as the coordinator decodes it) is the clipped delta plus noise; without
``training.local_dp`` nothing is added."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedge.edge_agent import local_dp
from fedge.edge_agent.client import Work
from fedge.edge_agent.state import State
from fedge.edge_agent.uploads import save_update
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_update

#: 40,000 values: the noise's std is estimated to about 0.35%.
SPEC = ModelSpec.from_dict([{"name": "W", "shape": [200, 199]}, {"name": "b", "shape": [200]}])
#: Lossless: the decoded body is exactly what the device compressed.
EXACT = CompressionPolicy.from_dict({"topk_fraction": 1.0, "bits": 32, "error_feedback": False})


def _save(
    tmp_path: Any, training: dict[str, Any], base: Weights, local: Weights, rng: Any
) -> Weights:
    state = State(tmp_path)
    work = Work(
        assignment_id=7,
        status="assigned",
        task_id=1,
        base_version=0,
        upload_url="/api/v1/device/assignments/7/update",
        training=training,
    )
    entry = save_update(
        state,
        work,
        spec=SPEC,
        policy=EXACT,
        base=base,
        local=local,
        num_examples=10,
        metrics={},
        seed=0,
        noise_rng=rng,
    )
    return decode_update(state.outbox.body(entry), spec=SPEC, policy=EXACT).to_dense()


def _norm(arrays: Weights) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


@pytest.mark.parametrize("delta_norm", [0.2, 25.0])
def test_the_uploaded_update_is_the_clipped_delta_plus_noise_of_the_configured_std(
    tmp_path: Any, delta_norm: float
) -> None:
    clip, z = 1.0, 0.05
    rng = np.random.default_rng(4)
    base = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}
    direction = {t.name: rng.standard_normal(t.shape) for t in SPEC.tensors}
    scale = delta_norm / _norm(direction)
    local = {k: (base[k] + scale * direction[k]).astype(np.float32) for k in base}
    sent = _save(
        tmp_path,
        {"epochs": 1, "local_dp": {"clip_norm": clip, "noise_multiplier": z}},
        base,
        local,
        np.random.default_rng(5),
    )
    delta = {k: local[k].astype(np.float64) - base[k] for k in base}
    factor = min(1.0, clip / _norm(delta))
    noise = np.concatenate([(sent[k] - factor * delta[k]).ravel() for k in ("W", "b")])
    n, sigma = noise.size, z * clip
    assert abs(noise.std() / sigma - 1.0) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    # What is left without the noise is within the clip bound.
    assert _norm({k: factor * delta[k] for k in delta}) <= clip * (1 + 1e-9)


def test_without_local_dp_the_delta_goes_out_unchanged(tmp_path: Any) -> None:
    rng = np.random.default_rng(6)
    base = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}
    local = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    sent = _save(tmp_path, {"epochs": 1}, base, local, np.random.default_rng(7))
    for k in base:
        np.testing.assert_array_equal(sent[k], local[k] - base[k])


@pytest.mark.parametrize(
    "bad",
    [{"clip_norm": 0, "noise_multiplier": 1}, {"clip_norm": 1}, "yes", {"clip_norm": "x"}],
)
def test_malformed_local_dp_settings_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="local_dp"):
        local_dp.settings_of({"local_dp": bad})


def test_default_noise_is_not_reproducible() -> None:
    """Without a generator the noise comes from a CSPRNG-seeded one: two calls differ."""
    delta = {"w": np.zeros(64, np.float32)}
    a = local_dp.privatize(delta, clip_norm=1.0, noise_multiplier=1.0)
    b = local_dp.privatize(delta, clip_norm=1.0, noise_multiplier=1.0)
    assert not np.array_equal(a["w"], b["w"])
