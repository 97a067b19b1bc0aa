"""Real datasets for fleet simulations, bundled with scikit-learn (nothing is downloaded).

scikit-learn is a demo extra, so it is imported inside :func:`load_dataset` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "breast_cancer", "wine")


@dataclass(frozen=True)
class Dataset:
    """A train/test split with float32 features scaled on the training part only."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_dim(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def load_dataset(name: str, *, test_fraction: float, rng: np.random.Generator) -> Dataset:
    """Load a bundled dataset and hold out a stratified ``test_fraction`` for evaluation."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    from sklearn import datasets as skd  # demo extra, imported lazily

    loader = {
        "digits": skd.load_digits,
        "breast_cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
    }[name]
    bunch = loader()
    X = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    # Stratified split: the same test share of every class.
    test_mask = np.zeros(y.size, dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_mask[members[: round(members.size * test_fraction)]] = True
    X_train, X_test = X[~test_mask], X[test_mask]
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std[std == 0] = 1.0
    return Dataset(
        name=name,
        X_train=((X_train - mean) / std).astype(np.float32),
        y_train=y[~test_mask],
        X_test=((X_test - mean) / std).astype(np.float32),
        y_test=y[test_mask],
    )
