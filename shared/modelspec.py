"""Model specification: the ordered, named float32 tensors a task trains.

A :class:`ModelSpec` is the contract between coordinator and devices: every model download,
every update and every error-feedback residual must carry exactly these names, in this order,
with these shapes. ``Weights`` is the in-memory form of one set of values for a spec.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.shared.limits import DEFAULT_LIMITS, Limits

__all__ = ["ModelSpec", "TensorSpec", "Weights"]

#: Ordered mapping name -> float32 array, in spec order.
Weights = dict[str, np.ndarray]


def _check_name(name: object, limits: Limits) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"tensor name {name!r} is not valid UTF-8") from exc
    if len(encoded) > limits.max_name_bytes:
        raise ValueError(
            f"tensor name {name[:40]!r}... is {len(encoded)} bytes, "
            f"more than the limit of {limits.max_name_bytes}"
        )
    return name


def _check_shape(name: str, shape: object, limits: Limits) -> tuple[int, ...]:
    if isinstance(shape, str | bytes) or not isinstance(shape, Iterable):
        raise ValueError(f"tensor {name!r}: shape must be a list of integers, got {shape!r}")
    dims = list(shape)
    if len(dims) > limits.max_ndim:
        raise ValueError(
            f"tensor {name!r}: {len(dims)} dimensions, more than the limit of {limits.max_ndim}"
        )
    out: list[int] = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int | np.integer):
            raise ValueError(f"tensor {name!r}: dimension {d!r} is not an integer")
        if d < 0:
            raise ValueError(f"tensor {name!r}: dimension {int(d)} is negative")
        out.append(int(d))
    size = math.prod(out)
    if size > limits.max_tensor_elements:
        raise ValueError(
            f"tensor {name!r}: {size} elements, more than the limit of {limits.max_tensor_elements}"
        )
    return tuple(out)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: its name and shape (``()`` for a scalar)."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements (1 for a scalar, 0 if any dimension is 0)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """Ordered tensors of a model. Build it with :meth:`from_dict` or :meth:`from_weights`."""

    tensors: tuple[TensorSpec, ...]

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-able form: ``[{"name": "w", "shape": [64, 10]}, ...]``."""
        return [{"name": t.name, "shape": list(t.shape)} for t in self.tensors]

    @classmethod
    def from_dict(cls, data: object, *, limits: Limits = DEFAULT_LIMITS) -> ModelSpec:
        """Parse and validate the JSON form; ``ValueError`` names the first problem found."""
        if isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
            raise ValueError("model spec must be a list of {'name': ..., 'shape': [...]} objects")
        items = list(data)
        if not items:
            raise ValueError("model spec must name at least one tensor")
        if len(items) > limits.max_tensors:
            raise ValueError(
                f"model spec has {len(items)} tensors, more than the limit of {limits.max_tensors}"
            )
        tensors: list[TensorSpec] = []
        seen: set[str] = set()
        total = 0
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValueError(f"model spec entry {i} must be an object, got {item!r}")
            extra = set(item) - {"name", "shape"}
            if extra:
                raise ValueError(f"model spec entry {i}: unknown keys {sorted(map(str, extra))}")
            if "name" not in item or "shape" not in item:
                raise ValueError(f"model spec entry {i} needs both 'name' and 'shape'")
            name = _check_name(item["name"], limits)
            if name in seen:
                raise ValueError(f"model spec: duplicate tensor name {name!r}")
            seen.add(name)
            spec = TensorSpec(name, _check_shape(name, item["shape"], limits))
            total += spec.size
            tensors.append(spec)
        if total > limits.max_total_elements:
            raise ValueError(
                f"model spec has {total} parameters, more than the limit of "
                f"{limits.max_total_elements}"
            )
        return cls(tuple(tensors))

    @classmethod
    def from_weights(cls, weights: Mapping[str, np.ndarray]) -> ModelSpec:
        """The spec of a set of weights (names in mapping order, shapes of the arrays)."""
        return cls.from_dict([{"name": k, "shape": list(np.shape(v))} for k, v in weights.items()])

    def check(self, weights: Mapping[str, np.ndarray]) -> None:
        """Raise ``ValueError`` unless ``weights`` has exactly this spec's names, order, shapes."""
        names = tuple(weights)
        if names != self.names:
            missing = [n for n in self.names if n not in weights]
            extra = [n for n in names if n not in set(self.names)]
            if missing or extra:
                raise ValueError(f"weights do not match the spec: missing {missing}, extra {extra}")
            raise ValueError(f"weights are ordered {list(names)}, the spec {list(self.names)}")
        for t in self.tensors:
            shape = tuple(np.shape(weights[t.name]))
            if shape != t.shape:
                raise ValueError(f"tensor {t.name!r} has shape {shape}, the spec says {t.shape}")
