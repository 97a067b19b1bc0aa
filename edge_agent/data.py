"""Local training data: from an ``.npz`` file or a Python entry point, split for evaluation.

``--data`` takes either a path to an ``.npz`` file with arrays ``X`` and ``y`` — loaded with
``allow_pickle=False`` — or an entry point ``package.module:function`` whose function takes
no arguments and returns ``(X, y)`` or an iterable of ``(X_batch, y_batch)`` pairs (a
PyTorch ``DataLoader``, a generator), which are concatenated.

``X`` is real numbers of any shape ``[n, ...]`` (``[n, d]`` features, ``[n, 1, 8, 8]``
images); ``y`` has ``n`` rows: integer class labels (kept as int64) or float targets for
regression (kept as float32). What a trainer needs beyond that it checks itself (the
built-in ``softmax``/``mlp`` trainer: ``[n, d]`` features and labels in ``[0, C)``;
``flatten=True``, ``fedge agent run --flatten``, reshapes ``X`` to ``[n, d]``).
The data never leaves the device: only model updates do.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Local data is missing or malformed."""


@dataclass(frozen=True)
class LocalData:
    """A device's examples, split into a training part and a held-out evaluation part."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_eval: np.ndarray
    y_eval: np.ndarray

    @property
    def num_train(self) -> int:
        return int(self.X_train.shape[0])


def load_entry_point(spec: str) -> Any:
    """The object named by ``module:attribute`` (attribute may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"{spec!r} is not an entry point of the form module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DataError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def check_arrays(X: Any, y: Any, *, flatten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``X`` as float32 ``[n, ...]`` and ``y`` as int64 labels or float32 targets with ``n``
    rows, or :class:`DataError`. ``flatten`` reshapes ``X`` to ``[n, d]``."""
    x = np.asarray(X)
    targets = np.asarray(y)
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"X must be a non-empty array [n, ...], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"X must be real numbers, got dtype {x.dtype}")
    if targets.ndim < 1 or targets.shape[0] != x.shape[0]:
        raise DataError(f"y must have shape [{x.shape[0]}, ...], got {list(targets.shape)}")
    x32 = x.astype(np.float32)
    if flatten:
        x32 = x32.reshape(x32.shape[0], -1)
    if not np.isfinite(x32).all():
        raise DataError("X contains NaN or Inf")
    if np.issubdtype(targets.dtype, np.integer):
        return x32, targets.astype(np.int64)
    if np.issubdtype(targets.dtype, np.floating) or targets.dtype == np.bool_:
        y32 = targets.astype(np.float32)
        if not np.isfinite(y32).all():
            raise DataError("y contains NaN or Inf")
        return x32, y32
    raise DataError(f"y must hold integer labels or float targets, got dtype {targets.dtype}")


def _concatenate_batches(source: str, batches: Iterable[Any]) -> tuple[Any, Any]:
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i, batch in enumerate(batches):
        try:
            xb, yb = batch
        except (TypeError, ValueError):
            raise DataError(f"{source!r}: batch {i} is not a pair (X, y)") from None
        xs.append(np.asarray(xb))
        ys.append(np.asarray(yb))
    if not xs:
        raise DataError(f"{source!r} returned no batches")
    try:
        return np.concatenate(xs), np.concatenate(ys)
    except ValueError as exc:
        raise DataError(f"{source!r}: batches of different shapes: {exc}") from None


def _is_pair(result: Any) -> bool:
    return (
        isinstance(result, tuple | list)
        and len(result) == 2
        and all(hasattr(part, "shape") for part in result)
    )


def load_arrays(source: str, *, flatten: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` from an ``.npz`` path or a ``module:function`` entry point."""
    path = Path(source)
    if path.suffix == ".npz" or path.exists():
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "X" not in archive or "y" not in archive:
                    raise DataError(f"{path} must hold arrays 'X' and 'y'")
                return check_arrays(archive["X"], archive["y"], flatten=flatten)
        except FileNotFoundError:
            raise DataError(f"{path} does not exist") from None
        except (OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    func = load_entry_point(source)
    if not callable(func):
        raise DataError(f"{source!r} is not callable")
    result = func()
    if _is_pair(result):
        X, y = result
    elif isinstance(result, Iterable) and not isinstance(result, str | bytes | dict):
        X, y = _concatenate_batches(source, result)
    else:
        raise DataError(f"{source!r} must return (X, y) or an iterable of (X, y) batches")
    return check_arrays(X, y, flatten=flatten)


def split_local(
    X: np.ndarray, y: np.ndarray, *, eval_fraction: float, rng: np.random.Generator
) -> LocalData:
    """Shuffle and hold out ``eval_fraction`` of the examples (at least one stays for
    training; no evaluation part when there are too few examples)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError("eval_fraction must be in [0, 1)")
    n = X.shape[0]
    order = rng.permutation(n)
    n_eval = min(round(n * eval_fraction), n - 1)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return LocalData(X[train_idx], y[train_idx], X[eval_idx], y[eval_idx])
