"""Server optimizers: how the averaged client delta moves the global model.

Every strategy receives the staleness-weighted average of the client deltas
``d = sum(w_i * delta_i) / sum(w_i)`` (a pseudo-gradient pointing *up*-hill of the clients'
progress, since ``delta = w_local - w_base``) and returns the new weights:

- ``FedAvg``: ``w <- w + lr * d`` (plain FedAvg for ``lr = 1``);
- ``FedAvgM`` (Hsu et al., 2019): ``m <- beta * m + d``; ``w <- w + lr * m``;
- ``FedAdam`` / ``FedYogi`` (Reddi et al., 2021): first and second moments of ``d``,
  ``w <- w + lr * m / (sqrt(v) + eps)``.

Optimizer state (momentum buffers) is a flat ``name -> float64 array`` mapping. It is persisted
as an ``.npz`` blob referenced by ``Task.optimizer_state_digest`` and committed in the same
transaction as the model version it produced, so it survives restarts and never runs ahead of
the model.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from fedge.coordinator.engine.config import AggregationConfig

OptimizerState = dict[str, np.ndarray]
Arrays = Mapping[str, np.ndarray]


class Strategy(ABC):
    """One server update rule. Stateless strategies ignore and return an empty state."""

    name: str = ""

    def __init__(self, *, lr: float) -> None:
        self.lr = float(lr)

    @abstractmethod
    def step(
        self, weights: Arrays, delta: Arrays, state: OptimizerState
    ) -> tuple[dict[str, np.ndarray], OptimizerState]:
        """New float32 weights and new state. ``delta`` is the weighted mean client delta
        (float64); it may be modified in place."""


def _to_f32(weights: Arrays, step: Arrays) -> dict[str, np.ndarray]:
    """``float32(float64(w) + step)`` per tensor. A float64 ``step`` (which the strategies
    create or own) receives the sum in place, so no further dense float64 buffers are
    allocated; the result is bit-identical (float64 addition is commutative).

    A sum beyond float32's range becomes infinite without a warning: the caller checks the
    result (``fedge.coordinator.engine.apply.compute`` fails the aggregation)."""
    out: dict[str, np.ndarray] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for name, w in weights.items():
            s = step[name]
            if s.dtype == np.float64 and s.flags.writeable and s.shape == np.shape(w):
                out[name] = np.add(s, w, out=s).astype(np.float32)
            else:
                out[name] = (np.asarray(w, dtype=np.float64) + s).astype(np.float32)
    return out


class FedAvg(Strategy):
    name = "fedavg"

    def step(
        self, weights: Arrays, delta: Arrays, state: OptimizerState
    ) -> tuple[dict[str, np.ndarray], OptimizerState]:
        scaled: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            scaled[name] = np.multiply(d, self.lr, out=d) if d.dtype == np.float64 else d * self.lr
        return _to_f32(weights, scaled), {}


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, *, lr: float, momentum: float) -> None:
        super().__init__(lr=lr)
        self.momentum = float(momentum)

    def step(
        self, weights: Arrays, delta: Arrays, state: OptimizerState
    ) -> tuple[dict[str, np.ndarray], OptimizerState]:
        new_state: OptimizerState = {}
        steps: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            m = state.get(f"m/{name}")
            m = np.asarray(d, dtype=np.float64).copy() if m is None else self.momentum * m + d
            new_state[f"m/{name}"] = m
            steps[name] = self.lr * m
        return _to_f32(weights, steps), new_state


class FedAdaptive(Strategy):
    """FedAdam and FedYogi; they differ only in the second-moment update."""

    def __init__(self, *, lr: float, beta1: float, beta2: float, eps: float, yogi: bool) -> None:
        super().__init__(lr=lr)
        self.beta1, self.beta2, self.eps, self.yogi = beta1, beta2, eps, yogi
        self.name = "fedyogi" if yogi else "fedadam"

    def step(
        self, weights: Arrays, delta: Arrays, state: OptimizerState
    ) -> tuple[dict[str, np.ndarray], OptimizerState]:
        new_state: OptimizerState = {}
        steps: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            d = np.asarray(d, dtype=np.float64)
            m = state.get(f"m/{name}", np.zeros_like(d))
            v = state.get(f"v/{name}", np.full_like(d, self.eps**2))
            m = self.beta1 * m + (1.0 - self.beta1) * d
            d2 = d * d
            if self.yogi:
                v = v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
            else:
                v = self.beta2 * v + (1.0 - self.beta2) * d2
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
            steps[name] = self.lr * m / (np.sqrt(v) + self.eps)
        return _to_f32(weights, steps), new_state


def make_strategy(config: AggregationConfig) -> Strategy:
    """The strategy a task asks for. ``fedavg`` with ``server_momentum > 0`` is FedAvgM."""
    if config.strategy in ("fedadam", "fedyogi"):
        return FedAdaptive(
            lr=config.server_lr,
            beta1=config.server_beta1,
            beta2=config.server_beta2,
            eps=config.server_eps,
            yogi=config.strategy == "fedyogi",
        )
    if config.strategy == "fedavgm" or config.server_momentum > 0:
        momentum = config.server_momentum if config.server_momentum > 0 else 0.9
        return FedAvgM(lr=config.server_lr, momentum=momentum)
    return FedAvg(lr=config.server_lr)


def state_to_bytes(state: OptimizerState) -> bytes:
    """Serialize optimizer state as an uncompressed ``.npz`` of plain float arrays (object
    arrays are never written nor read)."""
    buf = io.BytesIO()
    np.savez(
        buf, allow_pickle=False, **{k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    )
    return buf.getvalue()


def state_from_bytes(data: bytes) -> OptimizerState:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: np.asarray(npz[name], dtype=np.float64) for name in npz.files}
