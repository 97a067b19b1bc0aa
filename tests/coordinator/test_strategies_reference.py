"""The server optimizers against references written out here from the papers' formulas, bit
for bit over several steps (the state carried between them), float64 and float32 deltas, the
configuration each strategy is built from, the float32 overflow of a step, and the state's
serialization (float64 arrays, never a pickle)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.strategies import (
    FedAdaptive,
    FedAvg,
    FedAvgM,
    make_strategy,
    state_from_bytes,
    state_to_bytes,
)

SHAPES = {"W": (6, 5), "b": (5,)}


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _deltas(rng: np.random.Generator, dtype: type, scale: float) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}


def _apply(w: dict[str, np.ndarray], step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``float32(float64(w) + float64(step))``."""
    return {k: (w[k].astype(np.float64) + step[k].astype(np.float64)).astype(np.float32) for k in w}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fedavg_steps_by_lr_times_the_delta_in_float64(dtype: type) -> None:
    """``w + lr * d`` added in float64 and rounded once to float32, for float64 deltas and for
    float32 ones (whose product with lr stays float32)."""
    rng = np.random.default_rng(1)
    w, d = _weights(rng), _deltas(rng, dtype, 0.3)
    want = _apply(w, {k: d[k] * 0.37 for k in d})
    new, state = FedAvg(lr=0.37).step(w, {k: v.copy() for k, v in d.items()}, {})
    _same(new, want)
    assert state == {}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fedavgm_carries_float64_momentum_across_steps(dtype: type) -> None:
    """``m <- beta m + d`` (``m = d`` at first), ``w <- w + lr m``, three steps; the buffer is
    float64 whatever the delta's dtype."""
    rng = np.random.default_rng(2)
    strategy = FedAvgM(lr=0.8, momentum=0.6)
    w, state = _weights(rng), {}
    m: dict[str, np.ndarray] = {}
    for _ in range(3):
        d = _deltas(rng, dtype, 0.5)
        m = {k: d[k].astype(np.float64) if k not in m else 0.6 * m[k] + d[k] for k in d}
        want = _apply(w, {k: 0.8 * m[k] for k in m})
        w, state = strategy.step(w, d, state)
        _same(w, want)
        _same(state, {f"m/{k}": m[k] for k in m})


@pytest.mark.parametrize("yogi", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adaptive_optimizers_match_the_papers_updates(yogi: bool, dtype: type) -> None:
    """FedAdam / FedYogi (Reddi et al., 2021): ``m <- b1 m + (1 - b1) d``; Adam
    ``v <- b2 v + (1 - b2) d^2``, Yogi ``v <- v - (1 - b2) d^2 sign(v - d^2)``; ``w <- w + lr m /
    (sqrt(v) + eps)``, from ``m = 0`` and ``v = eps^2``, in float64, three steps. The deltas
    are of the order of eps, so the initial ``v`` counts."""
    b1, b2, eps, lr = 0.7, 0.9, 0.05, 0.2
    rng = np.random.default_rng(3)
    strategy = FedAdaptive(lr=lr, beta1=b1, beta2=b2, eps=eps, yogi=yogi)
    w, state = _weights(rng), {}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, eps**2) for k, s in SHAPES.items()}
    for _ in range(3):
        d = _deltas(rng, dtype, 0.05)
        step = {}
        for k in d:
            x = d[k].astype(np.float64)
            m[k] = b1 * m[k] + (1.0 - b1) * x
            if yogi:
                v[k] = v[k] - (1.0 - b2) * (x * x) * np.sign(v[k] - x * x)
            else:
                v[k] = b2 * v[k] + (1.0 - b2) * (x * x)
            step[k] = lr * m[k] / (np.sqrt(v[k]) + eps)
        want = _apply(w, step)
        w, state = strategy.step(w, d, state)
        _same(w, want)
        _same(state, {**{f"m/{k}": m[k] for k in m}, **{f"v/{k}": v[k] for k in v}})


def test_yogi_leaves_a_second_moment_equal_to_the_squared_delta() -> None:
    """Where ``v == d^2`` exactly, Yogi's sign is 0 and ``v`` stays as it is."""
    strategy = FedAdaptive(lr=0.1, beta1=0.5, beta2=0.5, eps=1e-3, yogi=True)
    d = {"w": np.array([0.5, 0.25])}
    state = {"m/w": np.zeros(2), "v/w": np.array([0.25, 1.0])}
    _, new = strategy.step({"w": np.zeros(2, np.float32)}, d, state)
    np.testing.assert_array_equal(new["v/w"], [0.25, 1.0 - 0.5 * 0.0625])


@pytest.mark.parametrize(
    ("data", "kind", "name", "params"),
    [
        ({"server_lr": 0.5}, FedAvg, "fedavg", {"lr": 0.5}),
        ({"server_momentum": 0.3}, FedAvgM, "fedavgm", {"lr": 1.0, "momentum": 0.3}),
        ({"strategy": "fedavgm"}, FedAvgM, "fedavgm", {"lr": 1.0, "momentum": 0.9}),
        ({"strategy": "fedavgm", "server_momentum": 0.5}, FedAvgM, "fedavgm", {"momentum": 0.5}),
        (
            {"strategy": "fedadam", "server_beta1": 0.8, "server_beta2": 0.95, "server_eps": 0.01},
            FedAdaptive,
            "fedadam",
            {"beta1": 0.8, "beta2": 0.95, "eps": 0.01, "yogi": False},
        ),
        (
            {"strategy": "fedyogi", "server_lr": 0.02},
            FedAdaptive,
            "fedyogi",
            {"lr": 0.02, "yogi": True},
        ),
    ],
)
def test_a_strategy_is_built_from_the_tasks_configuration(
    data: dict[str, object], kind: type, name: str, params: dict[str, object]
) -> None:
    """``strategy: fedavgm`` without a momentum takes 0.9; a momentum alone makes FedAvgM; the
    adaptive ones take the betas and eps; each says its name."""
    strategy = make_strategy(AggregationConfig.from_dict(data))
    assert type(strategy) is kind and strategy.name == name
    assert {k: getattr(strategy, k) for k in params} == params


def test_a_step_beyond_float32_becomes_infinite_without_a_warning() -> None:
    """The caller checks the new model for infinities (apply.compute fails the aggregation):
    the step itself neither warns nor raises."""
    w = {"w": np.array([3e38, -3e38, 1.0], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, _ = FedAvg(lr=1.0).step(w, {"w": np.array([3e38, -3e38, 1.0])}, {})
    assert new["w"][0] == np.inf and new["w"][1] == -np.inf and new["w"][2] == 2.0


def test_the_state_is_stored_and_read_as_float64_arrays() -> None:
    """float32 (or integer) buffers are written and read back as float64."""
    data = state_to_bytes({"m/w": np.array([0.1, 2.0], np.float32), "n": np.array([3])})
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        assert {k: stored[k].dtype for k in stored.files} == {"m/w": np.float64, "n": np.float64}
    buf = io.BytesIO()
    np.savez(buf, **{"m/w": np.array([0.1, 2.0], np.float32)})
    restored = state_from_bytes(buf.getvalue())
    assert restored["m/w"].dtype == np.float64
    np.testing.assert_array_equal(restored["m/w"], np.array([0.1, 2.0], np.float32))


def test_a_state_blob_holding_a_pickle_is_refused() -> None:
    """An object array (stored as a pickle) is never unpickled, whatever it holds."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **{"m/w": np.array([1.0, 2.0], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        state_from_bytes(buf.getvalue())
