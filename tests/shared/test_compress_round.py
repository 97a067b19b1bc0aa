"""compress_round: the device's update step with momentum-corrected error feedback, residual
decay by missed versions and the top-k warm-up around ``compress``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from fedge.shared.compression import compress, compress_round, decompress, missed_versions
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy

SPEC = ModelSpec.from_dict([{"name": "w", "shape": [30, 20]}, {"name": "b", "shape": [20]}])


@dataclass
class Memory:
    """A FeedbackMemory as the agent keeps one (without the file)."""

    values: Weights
    velocity: Weights | None = None
    version: int | None = None
    spec: ModelSpec = field(default=SPEC)

    @classmethod
    def zeros(cls) -> Memory:
        return cls({t.name: np.zeros(t.shape, np.float32) for t in SPEC.tensors})

    def snapshot(self) -> tuple[Weights, Weights | None, int | None]:
        vel = None if self.velocity is None else {k: v.copy() for k, v in self.velocity.items()}
        return {k: v.copy() for k, v in self.values.items()}, vel, self.version


def deltas(seed: int, n: int) -> list[Weights]:
    rng = np.random.default_rng(seed)
    return [
        {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}
        for _ in range(n)
    ]


def flat(w: Weights) -> np.ndarray:
    return np.concatenate([w[t.name].ravel() for t in SPEC.tensors])


def test_without_the_new_fields_it_is_compress_to_the_bit() -> None:
    policy = CompressionPolicy(topk_fraction=0.05, bits=4, chunk=32)
    memory, residual = Memory.zeros(), Residual.zeros(SPEC)
    for v, d in enumerate(deltas(1, 5)):
        a = compress_round(d, policy, np.random.default_rng([3, v]), memory, base_version=v)
        b = compress(d, policy, np.random.default_rng([3, v]), residual)
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            np.testing.assert_array_equal(ta.indices, tb.indices)
            assert ta.quantized is not None and tb.quantized is not None
            np.testing.assert_array_equal(ta.quantized.codes, tb.quantized.codes)
            np.testing.assert_array_equal(ta.quantized.scales, tb.quantized.scales)
        np.testing.assert_array_equal(flat(memory.values), flat(residual.values))
        assert (memory.velocity, memory.version) == (None, v)


def test_momentum_correction_and_factor_masking() -> None:
    """Per round u <- m*u + delta; r <- r + u; send C(r); r <- r - C(r); u <- 0 where sent."""
    m = 0.9
    policy = CompressionPolicy(topk_fraction=0.05, bits=32, momentum=m)
    memory = Memory.zeros()
    u_ref = np.zeros(SPEC.num_params, np.float32)
    u_sum = np.zeros(SPEC.num_params, np.float64)
    sent_sum = np.zeros(SPEC.num_params, np.float64)
    for v, d in enumerate(deltas(2, 8)):
        u_ref = np.float32(m) * u_ref + flat(d)
        u_sum += u_ref
        c = compress_round(d, policy, np.random.default_rng(v), memory, base_version=v)
        sent = flat(decompress(c))
        sent_sum += sent
        was_sent = sent != 0
        assert memory.velocity is not None
        u = flat(memory.velocity)
        assert not u[was_sent].any()  # masked where values went out
        np.testing.assert_allclose(u[~was_sent], u_ref[~was_sent], rtol=1e-6, atol=1e-6)
        u_ref[was_sent] = 0.0
        # the residual accumulates velocities: what was sent plus what is left is sum(u)
        np.testing.assert_allclose(sent_sum + flat(memory.values), u_sum, rtol=1e-5, atol=1e-4)


def test_momentum_changes_nothing_when_everything_is_sent() -> None:
    policy = CompressionPolicy(topk_fraction=1.0, bits=32, momentum=0.9)
    memory = Memory.zeros()
    for v, d in enumerate(deltas(3, 3)):
        out = decompress(
            compress_round(d, policy, np.random.default_rng(0), memory, base_version=v)
        )
        np.testing.assert_array_equal(flat(out), flat(d))
        assert memory.velocity is not None and not flat(memory.velocity).any()
        assert not flat(memory.values).any()


@pytest.mark.parametrize(
    ("stored", "base", "missed"), [(None, 7, 0), (6, 7, 0), (4, 7, 2), (9, 7, 0)]
)
def test_missed_versions(stored: int | None, base: int, missed: int) -> None:
    assert missed_versions(stored, base) == missed


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_residual_and_velocity_decay_by_the_versions_missed(momentum: float) -> None:
    """A dense policy sends x = delta + decayed residual (+ decayed velocity) exactly."""
    decay = 0.5
    policy = CompressionPolicy(topk_fraction=1.0, bits=32, momentum=momentum, residual_decay=decay)
    d, r, u = deltas(4, 3)
    for version, base, factor in [(3, 4, 1.0), (3, 6, decay**2), (None, 6, 1.0)]:
        velocity = {k: a.copy() for k, a in u.items()} if momentum else None
        memory = Memory({k: a.copy() for k, a in r.items()}, velocity, version)
        c = compress_round(d, policy, np.random.default_rng(0), memory, base_version=base)
        f, mf = np.float32(factor), np.float32(momentum) * np.float32(factor)
        want = flat(d) + f * flat(r) + (mf * flat(u) if momentum else 0)
        np.testing.assert_allclose(flat(decompress(c)), want, rtol=1e-6, atol=1e-6)
        assert memory.version == base


def test_decay_makes_an_absent_device_forget_gradually() -> None:
    """Top-k with error feedback: a device back after 3 missed versions carries a quarter...
    eighth of its old residual (decay 0.5), one without decay all of it."""
    d0, d1 = deltas(5, 2)
    norms = {}
    for decay in (1.0, 0.5):
        policy = CompressionPolicy(topk_fraction=0.01, bits=32, residual_decay=decay)
        memory = Memory.zeros()
        compress_round(d0, policy, np.random.default_rng(0), memory, base_version=0)
        before = np.linalg.norm(flat(memory.values))
        tiny = {k: np.zeros_like(a) for k, a in d1.items()}
        compress_round(tiny, policy, np.random.default_rng(0), memory, base_version=4)
        norms[decay] = np.linalg.norm(flat(memory.values)) / before
    assert norms[1.0] > 0.95
    assert norms[0.5] < 0.13  # 0.5**3 of it, less what was sent


def test_warmup_sends_more_values_early() -> None:
    policy = CompressionPolicy(topk_fraction=0.01, bits=4, chunk=64, warmup_rounds=3, momentum=0.5)
    memory = Memory.zeros()
    counts = [
        compress_round(d, policy, np.random.default_rng(v), memory, base_version=v).nnz
        for v, d in enumerate(deltas(6, 5))
    ]
    assert counts[0] > counts[1] > counts[2] > counts[3] == counts[4]


def test_a_failed_step_leaves_the_memory_as_it_was() -> None:
    policy = CompressionPolicy(topk_fraction=0.1, bits=4, momentum=0.9, residual_decay=0.5)
    memory = Memory.zeros()
    good = deltas(7, 2)
    compress_round(good[0], policy, np.random.default_rng(0), memory, base_version=0)
    values, velocity, version = memory.snapshot()
    bad = {k: a.copy() for k, a in good[1].items()}
    bad["w"][3, 4] = np.nan
    wrong_shape = {"w": np.ones((30, 21), np.float32), "b": np.ones(20, np.float32)}
    for delta in (bad, wrong_shape):
        with pytest.raises(ValueError):
            compress_round(delta, policy, np.random.default_rng(1), memory, base_version=5)
        np.testing.assert_array_equal(flat(memory.values), flat(values))
        assert memory.velocity is not None and velocity is not None
        np.testing.assert_array_equal(flat(memory.velocity), flat(velocity))
        assert memory.version == version


def test_memory_and_policy_must_agree() -> None:
    d = deltas(8, 1)[0]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="momentum needs"):
        compress_round(d, CompressionPolicy(momentum=0.5), rng, None, base_version=0)
    with pytest.raises(ValueError, match="disables it"):
        compress_round(
            d, CompressionPolicy(error_feedback=False), rng, Memory.zeros(), base_version=0
        )
    other = Memory.zeros()
    other.velocity = {"w": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="velocity"):
        compress_round(d, CompressionPolicy(momentum=0.5), rng, other, base_version=0)


def test_turning_momentum_off_drops_the_velocity() -> None:
    d = deltas(9, 2)
    memory = Memory.zeros()
    compress_round(
        d[0], CompressionPolicy(momentum=0.9), np.random.default_rng(0), memory, base_version=0
    )
    assert memory.velocity is not None
    compress_round(d[1], CompressionPolicy(), np.random.default_rng(0), memory, base_version=1)
    assert memory.velocity is None
