"""Federate a PyTorch ``nn.Module``: the trainer factory, weights by ``state_dict`` name, files.

Needs the ``torch`` extra (``pip install 'fedge[torch]'``); the agent core never imports this
module, it is loaded by name when a task's ``training.trainer`` points at a factory made here.

In your package::

    # mypkg/model.py
    from torch import nn
    from fedge.edge_agent.torch_adapter import federate

    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))

    trainer = federate(build)   # the task's training.trainer: "mypkg.model:trainer"

**Weights and buffers.** The task's tensors are the module's ``state_dict`` entries of a
floating dtype, in ``state_dict`` order and under its names: the parameters and float buffers
such as BatchNorm's ``running_mean``/``running_var``, which are averaged like weights (the
coordinator cannot tell them apart). Integer buffers (BatchNorm's ``num_batches_tracked``)
are not part of the task: each device keeps its own in its module, which lives as long as the
agent, and a model loaded with :func:`load_into` leaves them as the module has them. Lossy
update compression (top-k, few bits) can push a variance slightly below zero, which would
make BatchNorm divide by the square root of a negative number: :func:`load_weights` clamps
every ``*running_var`` entry at 0.

**Training.** ``federate`` runs a plain loop: ``epochs`` passes over the device's data in
minibatches of ``batch_size`` (shuffled by the agent's seeded generator), the loss (default:
cross-entropy for integer labels, mean squared error for float targets), an optimizer
(default: SGD with the task's ``lr`` and ``training.extra.momentum``), and FedProx's
``proximal_mu`` term when the task sets it. ``metrics(y_true, outputs)`` may add named
numbers (``macro_f1``, ...) to the evaluation; they travel to the coordinator and are
averaged per round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.edge_agent.data import DataError, LocalData, load_entry_point
from fedge.edge_agent.trainers import Trainer, TrainerFactory, TrainingConfig, TrainResult
from fedge.shared.modelfiles import format_for_path, read_model_file
from fedge.shared.modelspec import ModelSpec, Weights

__all__ = [
    "TorchTrainer",
    "build_module",
    "federate",
    "init_model",
    "load_into",
    "load_weights",
    "module_spec",
    "module_weights",
    "read_state_dict",
    "save_state_dict",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[Iterator[nn.Parameter], TrainingConfig, Mapping[str, Any]], Any]
MetricsFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


def _float_entries(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in module.state_dict().items() if torch.is_floating_point(t)}


def module_spec(module: nn.Module) -> ModelSpec:
    """The task's tensors for ``module``: its floating ``state_dict`` entries, in order."""
    return ModelSpec.from_dict(
        [{"name": n, "shape": list(t.shape)} for n, t in _float_entries(module).items()]
    )


def module_weights(module: nn.Module) -> Weights:
    """The module's floating ``state_dict`` entries as float32 numpy arrays (copies)."""
    return {
        n: t.detach().to("cpu", torch.float32).numpy().copy()
        for n, t in _float_entries(module).items()
    }


def load_weights(module: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy ``weights`` into the module's floating entries in place (integer buffers stay);
    ``ValueError`` unless the names and shapes are exactly the module's."""
    entries = _float_entries(module)
    module_spec(module).check({n: weights[n] for n in entries if n in weights})
    extra = sorted(set(weights) - set(entries))
    if extra:
        raise ValueError(f"weights have tensors the module lacks: {extra[:5]}")
    with torch.no_grad():
        for name, tensor in entries.items():
            tensor.copy_(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)))
            if name.endswith("running_var"):
                tensor.clamp_(min=0.0)  # lossy update compression can push it below 0
    return module


def build_module(build: str | Callable[[], nn.Module], *, seed: int = 0) -> nn.Module:
    """The module ``build`` returns (an entry point ``module:function`` or a callable), with
    torch's generator seeded first so the initial weights are reproducible."""
    func = load_entry_point(build) if isinstance(build, str) else build
    if not callable(func):
        raise DataError(f"{build!r} is not callable")
    torch.manual_seed(seed)
    module = func()
    if not isinstance(module, nn.Module):
        raise DataError(f"{build!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def init_model(
    build: str | Callable[[], nn.Module], *, seed: int = 0
) -> tuple[dict[str, Any], Weights]:
    """The task's ``model`` object (``{"spec": [...]}``) and initial weights of a module."""
    module = build_module(build, seed=seed)
    return {"spec": module_spec(module).to_dict()}, module_weights(module)


def save_state_dict(path: str | Path, weights: Mapping[str, np.ndarray]) -> int:
    """Write ``weights`` as a ``state_dict`` file (``torch.save`` of name -> tensor); the
    bytes written."""
    state = {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in weights.items()}
    torch.save(state, str(path))
    return Path(path).stat().st_size


def read_state_dict(path: str | Path) -> Weights:
    """The floating tensors of a ``state_dict`` file, loaded with ``weights_only=True`` (no
    arbitrary unpickling)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise ValueError(f"{path} is not a readable state_dict file: {exc}") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} does not hold a mapping of names to tensors")
    return {
        k: v.detach().to(torch.float32).numpy().copy()
        for k, v in state.items()
        if torch.is_floating_point(v)
    }


def load_into(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a downloaded model file (``.pt``/``.pth`` state_dict, ``.npz``, ``.safetensors``
    or the wire format) into ``module``, in place; returns it in eval mode."""
    if format_for_path(path) == "torch":
        weights = read_state_dict(path)
    else:
        weights = read_model_file(path).weights
    load_weights(module, weights)
    return module.eval()


def _default_loss(targets: torch.Tensor) -> LossFn:
    if targets.dtype == torch.int64:
        return nn.CrossEntropyLoss()
    mse = nn.MSELoss()

    def loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse(outputs, y.reshape(outputs.shape))

    return loss


def _default_optimizer(
    params: Iterator[nn.Parameter], cfg: TrainingConfig, config: Mapping[str, Any]
) -> torch.optim.Optimizer:
    extra = config.get("extra") or {}
    momentum = float(extra.get("momentum", 0.0)) if isinstance(extra, Mapping) else 0.0
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum)


class TorchTrainer:
    """Trains one module on one device's data (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        data: LocalData,
        *,
        loss: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        metrics: MetricsFn | None = None,
    ) -> None:
        self.module = module
        self.data = data
        self.X = torch.from_numpy(np.ascontiguousarray(data.X_train, dtype=np.float32))
        self.y = torch.from_numpy(np.ascontiguousarray(data.y_train))
        self.X_eval = torch.from_numpy(np.ascontiguousarray(data.X_eval, dtype=np.float32))
        self.y_eval = torch.from_numpy(np.ascontiguousarray(data.y_eval))
        self.loss = loss or _default_loss(self.y)
        self.optimizer = optimizer or _default_optimizer
        self.metrics = metrics
        self.classifier = self.y.dtype == torch.int64

    def train(
        self,
        weights: Weights,
        config: Mapping[str, Any],
        rng: np.random.Generator,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        cfg = TrainingConfig.from_mapping(config)
        load_weights(self.module, weights)
        torch.manual_seed(int(rng.integers(2**63 - 1)))  # dropout and the like
        base = [p.detach().clone() for p in self.module.parameters()] if cfg.proximal_mu else []
        opt = self.optimizer(self.module.parameters(), cfg, config)
        self.module.train()
        n = int(self.X.shape[0])
        epoch_loss, stopped, steps = float("nan"), False, 0
        for _ in range(cfg.epochs):
            order = torch.from_numpy(rng.permutation(n))
            total, seen = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                idx = order[start : start + cfg.batch_size]
                opt.zero_grad()
                loss = self.loss(self.module(self.X[idx]), self.y[idx])
                total += float(loss.detach()) * idx.numel()
                if cfg.proximal_mu:
                    prox = sum(
                        ((p - p0) ** 2).sum()
                        for p, p0 in zip(self.module.parameters(), base, strict=True)
                    )
                    loss = loss + cfg.proximal_mu / 2 * prox
                loss.backward()
                opt.step()
                seen += idx.numel()
                steps += 1
            if seen:
                epoch_loss = total / seen
            if stopped:
                break
        metrics = {"train_loss": epoch_loss, "steps": float(steps)}
        return TrainResult(module_weights(self.module), n, metrics=metrics, stopped=stopped)

    def predict(self, weights: Weights, X: torch.Tensor) -> torch.Tensor:
        """The module's outputs for ``X`` under ``weights`` (eval mode)."""
        load_weights(self.module, weights)
        self.module.eval()
        with torch.no_grad():
            outputs: torch.Tensor = self.module(X)
        return outputs

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Loss (and accuracy for labels, and the ``metrics`` function's numbers) on the
        device's held-out examples; empty when it has none."""
        n = int(self.X_eval.shape[0])
        if n == 0:
            return {}
        outputs = self.predict(weights, self.X_eval)
        with torch.no_grad():
            eval_loss = float(self.loss(outputs, self.y_eval))
        out = {
            "eval_loss": eval_loss,
            "num_eval_examples": float(n),
        }
        if self.classifier:
            out["eval_accuracy"] = float((outputs.argmax(dim=1) == self.y_eval).double().mean())
        if self.metrics is not None:
            extra = self.metrics(self.y_eval.numpy(), outputs.numpy())
            out.update({str(k): float(v) for k, v in extra.items()})
        return out


def federate(
    build: str | Callable[[], nn.Module],
    *,
    loss: LossFn | None = None,
    optimizer: OptimizerFactory | None = None,
    metrics: MetricsFn | None = None,
) -> TrainerFactory:
    """A trainer factory for the module ``build`` returns (name it in the task's
    ``training.trainer`` or ``fedge agent run --trainer``).

    ``loss(outputs, targets)`` defaults to cross-entropy for integer labels and mean squared
    error for float targets; ``optimizer(params, cfg, training)`` to SGD with ``cfg.lr``;
    ``metrics(y_true, outputs)`` returns extra named numbers for the evaluation."""

    def factory(model: Mapping[str, Any], data: LocalData) -> Trainer:
        module = build_module(build)
        if "spec" not in model:
            raise DataError("a PyTorch trainer needs a task whose model is given by 'spec'")
        want = ModelSpec.from_dict(model["spec"])
        have = module_spec(module)
        if want != have:
            mismatch = next(
                (
                    f"{a.name} {list(a.shape)} vs the module's {b.name} {list(b.shape)}"
                    for a, b in zip(want.tensors, have.tensors, strict=False)
                    if a != b
                ),
                f"{len(want.tensors)} tensors vs the module's {len(have.tensors)}",
            )
            raise DataError(f"the task's model spec does not match the module: {mismatch}")
        if data.X_train.dtype != np.float32:
            raise DataError("features must be float32 (fedge.edge_agent.data loads them so)")
        return TorchTrainer(module, data, loss=loss, optimizer=optimizer, metrics=metrics)

    return factory
