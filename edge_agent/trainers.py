"""Local trainers: the interface the agent drives, and the built-in numpy trainer.

A trainer holds the device's local data and trains a copy of the global weights::

    trainer.train(weights, config, rng, should_stop=...) -> TrainResult
    trainer.evaluate(weights) -> {"eval_loss": ..., "eval_accuracy": ..., ...}

The agent builds one trainer per task with a *factory* ``factory(model, data) -> Trainer``,
where ``model`` is the task's model object (docs/protocol.md) and ``data`` the device's
:class:`~fedge.edge_agent.data.LocalData`. The built-in factory handles the ``softmax`` and ``mlp``
architectures of :mod:`fedge.shared.architectures` (minibatch SGD on softmax cross-entropy, ReLU
hidden layers, optional FedProx proximal term ``proximal_mu``). Your own factory is given as
an entry point ``package.module:factory`` (``fedge agent run --trainer``).

``should_stop`` is checked between minibatches, so a cancelled round stops training within
one minibatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedge.edge_agent.data import DataError, LocalData, load_entry_point
from fedge.shared import architectures
from fedge.shared.modelspec import Weights


@dataclass(frozen=True)
class TrainResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    stopped: bool = False


class Trainer(Protocol):
    def train(
        self,
        weights: Weights,
        config: Mapping[str, Any],
        rng: np.random.Generator,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult: ...

    def evaluate(self, weights: Weights) -> dict[str, float]: ...


TrainerFactory = Callable[[Mapping[str, Any], LocalData], Trainer]


@dataclass(frozen=True)
class TrainingConfig:
    """The task's ``training`` object, checked."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    proximal_mu: float = 0.0

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> TrainingConfig:
        try:
            out = cls(
                epochs=int(config.get("epochs", 1)),
                batch_size=int(config.get("batch_size", 32)),
                lr=float(config.get("lr", 0.1)),
                proximal_mu=float(config.get("proximal_mu", 0.0) or 0.0),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad training config: {exc}") from None
        if out.epochs < 1 or out.batch_size < 1:
            raise ValueError("training.epochs and training.batch_size must be positive")
        if not (math.isfinite(out.lr) and out.lr > 0):
            raise ValueError("training.lr must be a positive number")
        if not (math.isfinite(out.proximal_mu) and out.proximal_mu >= 0):
            raise ValueError("training.proximal_mu must be >= 0")
        return out


def _loss_and_grads(
    layers: list[architectures.Layer], weights: Weights, X: np.ndarray, y: np.ndarray
) -> tuple[float, Weights]:
    """Mean softmax cross-entropy of a batch and its gradients (backpropagation)."""
    inputs = [X]
    h = X
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        z = h @ weights[layer.weight] + weights[layer.bias]
        if i < last:
            h = np.maximum(z, 0.0)
            inputs.append(h)
        else:
            h = z
    logp = architectures.log_softmax(h)
    n = X.shape[0]
    rows = np.arange(n)
    loss = float(-logp[rows, y].mean())
    g = np.exp(logp)
    g[rows, y] -= 1.0
    g = (g / n).astype(np.float32)
    grads: Weights = {}
    for i in range(last, -1, -1):
        layer = layers[i]
        grads[layer.weight] = inputs[i].T @ g
        grads[layer.bias] = g.sum(axis=0)
        if i > 0:
            g = (g @ weights[layer.weight].T) * (inputs[i] > 0)
    return loss, grads


class NumpyTrainer:
    """Minibatch SGD for the built-in ``softmax`` and ``mlp`` architectures."""

    def __init__(self, model: Mapping[str, Any], data: LocalData) -> None:
        self.model = dict(model)
        self.layers = architectures.layers(self.model)
        self.data = data
        check_builtin_data(data)
        self.X, self.y = architectures.check_inputs(self.model, data.X_train, data.y_train)
        if data.X_eval.shape[0]:
            architectures.check_inputs(self.model, data.X_eval, data.y_eval)

    def train(
        self,
        weights: Weights,
        config: Mapping[str, Any],
        rng: np.random.Generator,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        cfg = TrainingConfig.from_mapping(config)
        base = {name: np.asarray(w, dtype=np.float32) for name, w in weights.items()}
        local = {name: w.copy() for name, w in base.items()}
        X, y = self.X, self.y
        n = X.shape[0]
        lr = np.float32(cfg.lr)
        mu = np.float32(cfg.proximal_mu)
        epoch_loss, stopped, steps = float("nan"), False, 0
        for _ in range(cfg.epochs):
            order = rng.permutation(n)
            total, seen = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                idx = order[start : start + cfg.batch_size]
                loss, grads = _loss_and_grads(self.layers, local, X[idx], y[idx])
                for name, grad in grads.items():
                    if mu:
                        grad = grad + mu * (local[name] - base[name])
                    local[name] -= lr * grad
                total += loss * idx.size
                seen += idx.size
                steps += 1
            if seen:
                epoch_loss = total / seen
            if stopped:
                break
        metrics = {"train_loss": epoch_loss, "steps": float(steps)}
        return TrainResult(weights=local, num_examples=n, metrics=metrics, stopped=stopped)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Loss and accuracy on the device's held-out examples (empty when it has none)."""
        if self.data.X_eval.shape[0] == 0:
            return {}
        result = architectures.evaluate(self.model, weights, self.data.X_eval, self.data.y_eval)
        return {
            "eval_loss": result["loss"],
            "eval_accuracy": result["accuracy"],
            "num_eval_examples": float(self.data.X_eval.shape[0]),
        }


def check_builtin_data(data: LocalData) -> None:
    """:class:`DataError` unless the built-in classifiers can train on ``data``: features
    ``[n, d]`` and integer class labels."""
    shape = list(data.X_train.shape)
    if len(shape) != 2:
        raise DataError(
            f"the built-in softmax/mlp trainer needs 2-D features [n, d], the data is {shape}: "
            "flatten it (fedge agent run --flatten) or federate your own model "
            "(docs/agent.md, 'Federate your PyTorch model')"
        )
    for labels in (data.y_train, data.y_eval):
        integral = np.issubdtype(labels.dtype, np.integer) or bool(np.all(np.mod(labels, 1) == 0))
        if labels.ndim != 1 or not integral:
            raise DataError(
                "the built-in softmax/mlp trainer classifies: y must hold integer class labels "
                f"[n], got {labels.dtype} {list(labels.shape)}; float targets (regression) need "
                "your own trainer"
            )


def builtin_trainer(model: Mapping[str, Any], data: LocalData) -> Trainer:
    """The default factory: :class:`NumpyTrainer` for ``softmax`` and ``mlp`` models."""
    return NumpyTrainer(model, data)


def load_trainer_factory(entry_point: str | None) -> TrainerFactory:
    """The built-in factory, or the one named by ``module:factory``."""
    if not entry_point:
        return builtin_trainer
    factory = load_entry_point(entry_point)
    if not callable(factory):
        raise DataError(f"trainer {entry_point!r} is not callable")
    result: TrainerFactory = factory
    return result


BUILTIN_TRAINERS = ("softmax", "mlp")


def task_trainer_factory(training: Mapping[str, Any]) -> TrainerFactory:
    """The factory a task's ``training.trainer`` names: built-in for ``softmax``/``mlp`` (or
    when unset), else an entry point that must be installed on the device."""
    name = training.get("trainer")
    if name is None or name in BUILTIN_TRAINERS:
        return builtin_trainer
    return load_trainer_factory(str(name))
