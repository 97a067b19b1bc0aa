"""Built-in model architectures: tensor specs, seeded initial weights, forward pass, evaluation.

Both sides use this module: the coordinator builds a task's spec and initial weights from the
task's ``model`` object and evaluates model versions server-side; the edge agent's numpy
trainers train the same tensors under the same names. Two architectures exist:

- ``{"architecture": "softmax", "input_dim": D, "num_classes": C}``: multinomial logistic
  regression, tensors ``W`` [D, C] and ``b`` [C];
- ``{"architecture": "mlp", "input_dim": D, "num_classes": C, "hidden": [H1, ...]}``: a ReLU
  multilayer perceptron, tensors ``W0``, ``b0``, ``W1``, ``b1``, ... (the last layer outputs C).

``init`` chooses the initial weights: ``"he_glorot"`` (the default: He-normal for the ReLU
layers, Glorot-uniform for the output layer) or ``"he_normal"`` (He-normal for every layer).
Other keys (``seed``, an empty ``hidden`` for softmax) are allowed and ignored here. A model
given as ``{"spec": [...]}`` (custom weights uploaded by the administrator) has a spec but no
built-in forward pass.

To use a trained model: ``load(path)`` reads a file written by ``fedge admin models download
--format npz|safetensors`` (which records the task's model object) and returns a
:class:`Classifier` with ``predict(X)`` (class labels) and ``predict_proba(X)``::

    from fedge.shared import architectures
    clf = architectures.load("model.safetensors")
    labels = clf.predict(X)            # X: [n, input_dim]
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared.modelfiles import read_model_file
from fedge.shared.modelspec import ModelSpec, Weights

ARCHITECTURES = ("softmax", "mlp")
INITS = ("he_glorot", "he_normal")
MAX_PARAMS = 50_000_000
MAX_HIDDEN_LAYERS = 32


@dataclass(frozen=True)
class Layer:
    """One dense layer: tensor names and its (fan-in, fan-out)."""

    weight: str
    bias: str
    fan_in: int
    fan_out: int


def _positive_int(model: Mapping[str, Any], key: str) -> int:
    value = model.get(key)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"model.{key} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"model.{key} must be positive, got {value}")
    return int(value)


def _hidden(model: Mapping[str, Any]) -> list[int]:
    hidden = model.get("hidden", [])
    if hidden is None:
        return []
    if not isinstance(hidden, list | tuple):
        raise ValueError(f"model.hidden must be a list of layer widths, got {hidden!r}")
    if len(hidden) > MAX_HIDDEN_LAYERS:
        raise ValueError(f"model.hidden has {len(hidden)} layers; at most {MAX_HIDDEN_LAYERS}")
    widths = []
    for i, width in enumerate(hidden):
        if isinstance(width, bool) or not isinstance(width, int | np.integer) or width <= 0:
            raise ValueError(f"model.hidden[{i}] must be a positive integer, got {width!r}")
        widths.append(int(width))
    return widths


def layers(model: Mapping[str, Any]) -> list[Layer]:
    """The dense layers of a built-in architecture, input to output (validates the config)."""
    if not isinstance(model, Mapping):
        raise ValueError("model must be an object")
    arch = model.get("architecture")
    if arch not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown model architecture {arch!r} (built-in: {known})")
    input_dim = _positive_int(model, "input_dim")
    num_classes = _positive_int(model, "num_classes")
    hidden = _hidden(model)
    if arch == "softmax":
        if hidden:
            raise ValueError("a softmax model has no hidden layers; use architecture 'mlp'")
        result = [Layer("W", "b", input_dim, num_classes)]
    else:
        dims = [input_dim, *hidden, num_classes]
        result = [
            Layer(f"W{i}", f"b{i}", fan_in, fan_out)
            for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims))
        ]
    params = sum(layer.fan_in * layer.fan_out + layer.fan_out for layer in result)
    if params > MAX_PARAMS:
        raise ValueError(f"model has {params} parameters; at most {MAX_PARAMS} are allowed")
    return result


def build_spec(model: Mapping[str, Any]) -> ModelSpec:
    """The ordered tensor spec of ``model`` (a built-in architecture or an explicit ``spec``)."""
    if isinstance(model, Mapping) and "spec" in model and "architecture" not in model:
        return ModelSpec.from_dict(model["spec"])
    entries: list[dict[str, Any]] = []
    for layer in layers(model):
        entries.append({"name": layer.weight, "shape": [layer.fan_in, layer.fan_out]})
        entries.append({"name": layer.bias, "shape": [layer.fan_out]})
    return ModelSpec.from_dict(entries)


def init_weights(model: Mapping[str, Any], rng: np.random.Generator) -> Weights:
    """Seeded float32 initial weights, zero biases: He-normal for ReLU layers; for the output
    layer Glorot-uniform, or He-normal with ``"init": "he_normal"``."""
    init = model.get("init", INITS[0])
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    all_layers = layers(model)
    weights: Weights = {}
    for i, layer in enumerate(all_layers):
        if i < len(all_layers) - 1 or init == "he_normal":
            std = np.sqrt(2.0 / layer.fan_in)
            w = rng.standard_normal((layer.fan_in, layer.fan_out)) * std
        else:
            limit = np.sqrt(6.0 / (layer.fan_in + layer.fan_out))
            w = rng.uniform(-limit, limit, size=(layer.fan_in, layer.fan_out))
        weights[layer.weight] = w.astype(np.float32)
        weights[layer.bias] = np.zeros(layer.fan_out, dtype=np.float32)
    return weights


def generated_weights(model: Mapping[str, Any]) -> Weights | None:
    """The initial weights a coordinator generates for a built-in ``model`` (its ``seed``),
    which a device can generate too instead of downloading them; ``None`` for other models."""
    if not isinstance(model, Mapping) or model.get("architecture") not in ARCHITECTURES:
        return None
    seed = model.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        return None
    return init_weights(model, np.random.default_rng(seed))


def check_inputs(model: Mapping[str, Any], X: Any, y: Any | None = None) -> tuple[np.ndarray, ...]:
    """``X`` as float32 [n, input_dim] (and ``y`` as int64 labels in range), or ValueError."""
    first = layers(model)[0]
    num_classes = layers(model)[-1].fan_out
    x = np.asarray(X, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != first.fan_in:
        raise ValueError(f"X must have shape [n, {first.fan_in}], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("X contains NaN or Inf")
    if y is None:
        return (x,)
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape [{x.shape[0]}], got {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
        raise ValueError("y must hold integer class labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return x, labels


def forward(model: Mapping[str, Any], weights: Weights, X: Any) -> np.ndarray:
    """Logits [n, num_classes] of ``X`` under ``weights`` (ReLU between layers)."""
    all_layers = layers(model)
    (h,) = check_inputs(model, X)
    for i, layer in enumerate(all_layers):
        h = h @ weights[layer.weight] + weights[layer.bias]
        if i < len(all_layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def evaluate(model: Mapping[str, Any], weights: Weights, X: Any, y: Any) -> dict[str, float]:
    """Mean softmax cross-entropy and accuracy of ``weights`` on labelled data."""
    x, labels = check_inputs(model, X, y)
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on zero examples")
    logp = log_softmax(forward(model, weights, x))
    n = x.shape[0]
    loss = float(-logp[np.arange(n), labels].mean())
    accuracy = float((logp.argmax(axis=1) == labels).mean())
    return {"loss": loss, "accuracy": accuracy}


@dataclass(frozen=True)
class Classifier:
    """A trained built-in model: its ``model`` object and weights, ready to predict."""

    model: dict[str, Any]
    weights: Weights

    def logits(self, X: Any) -> np.ndarray:
        """Logits ``[n, num_classes]`` of ``X`` ``[n, input_dim]``."""
        return forward(self.model, self.weights, X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, num_classes]``."""
        return np.exp(log_softmax(self.logits(X)))

    def predict(self, X: Any) -> np.ndarray:
        """The most likely class of each row of ``X`` (int64 ``[n]``)."""
        return self.logits(X).argmax(axis=1).astype(np.int64)


def load(path: str | Path, *, model: Mapping[str, Any] | None = None) -> Classifier:
    """A :class:`Classifier` from a model file (``.npz``, ``.safetensors``, or the wire format
    with ``model`` given); ``model`` overrides the model object the file records.
    ``ValueError`` when the file is not a built-in architecture or does not match it."""
    stored = read_model_file(path)
    config = dict(model) if model is not None else stored.model
    if config is None:
        raise ValueError(
            f"{path} does not record its model object; pass model= (the task's 'model')"
        )
    if config.get("architecture") not in ARCHITECTURES:
        raise ValueError(
            f"{path} holds a custom model ({config!r:.60}); load it into your own code "
            "(for PyTorch: fedge.edge_agent.torch_adapter.load_into)"
        )
    build_spec(config).check(stored.weights)
    return Classifier(config, stored.weights)
