"""Local training data: from an ``.npz`` file or a Python entry point, split for evaluation.

``--data`` takes either a path to an ``.npz`` file with arrays ``X`` (float, [n, d]) and ``y``
(integer labels, [n]) — loaded with ``allow_pickle=False`` — or an entry point
``package.module:function`` whose function takes no arguments and returns ``(X, y)``.
The data never leaves the device: only model updates do.
"""

from __future__ import annotations

import importlib
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


def check_arrays(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``X`` as float32 [n, d] and ``y`` as int64 [n], or :class:`DataError`."""
    x = np.asarray(X)
    labels = np.asarray(y)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"X must be a non-empty 2-D array, got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"X must be real numbers, got dtype {x.dtype}")
    if labels.shape != (x.shape[0],):
        raise DataError(f"y must have shape [{x.shape[0]}], got {list(labels.shape)}")
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and bool(np.all(labels == np.round(labels)))
    )
    if not integral:
        raise DataError(f"y must hold integer class labels, got dtype {labels.dtype}")
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise DataError("X contains NaN or Inf")
    if labels.min() < 0:
        raise DataError("labels must not be negative")
    return x32, labels.astype(np.int64)


def load_arrays(source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` from an ``.npz`` path or a ``module:function`` entry point."""
    path = Path(source)
    if path.suffix == ".npz" or path.exists():
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "X" not in archive or "y" not in archive:
                    raise DataError(f"{path} must hold arrays 'X' and 'y'")
                return check_arrays(archive["X"], archive["y"])
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
    try:
        X, y = result
    except (TypeError, ValueError):
        raise DataError(f"{source!r} must return a pair (X, y)") from None
    return check_arrays(X, y)


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
