"""Federate a scikit-learn ``SGDClassifier``: its ``coef_`` and ``intercept_`` are the task's
tensors, each round is ``epochs`` passes of ``partial_fit`` over minibatches.

Needs scikit-learn on the device (it is not an agent dependency). In your package::

    # mypkg/linear.py
    from fedge.edge_agent.sklearn_adapter import sgd_classifier

    trainer = sgd_classifier(classes=range(10), loss="log_loss", alpha=1e-4)

and a task whose model is :func:`sgd_model` (``{"spec": [{"name": "coef", "shape": [C, d]},
{"name": "intercept", "shape": [C]}]}``, ``C`` = 1 for two classes, as scikit-learn stores
it), initial weights :func:`sgd_initial_weights` (zeros) uploaded with ``fedge admin tasks
create --weights``, and ``training.trainer`` ``"mypkg.linear:trainer"``. The task's ``lr`` is
the constant learning rate (``eta0``). Features must be ``[n, d]``; the evaluation reports
accuracy and ``macro_f1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import f1_score

from fedge.edge_agent.data import DataError, LocalData
from fedge.edge_agent.trainers import Trainer, TrainerFactory, TrainingConfig, TrainResult
from fedge.shared.modelspec import ModelSpec, Weights

__all__ = ["SGDTrainer", "sgd_classifier", "sgd_initial_weights", "sgd_model"]


def _rows(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


def sgd_model(num_features: int, num_classes: int) -> dict[str, Any]:
    """The task's ``model`` object for a linear classifier of ``num_features`` inputs."""
    rows = _rows(num_classes)
    return {
        "spec": [
            {"name": "coef", "shape": [rows, num_features]},
            {"name": "intercept", "shape": [rows]},
        ]
    }


def sgd_initial_weights(num_features: int, num_classes: int) -> Weights:
    """Zeros, where scikit-learn starts too."""
    rows = _rows(num_classes)
    return {
        "coef": np.zeros((rows, num_features), np.float32),
        "intercept": np.zeros(rows, np.float32),
    }


class SGDTrainer:
    """One device's ``SGDClassifier`` (see the module docstring)."""

    def __init__(
        self,
        model: Mapping[str, Any],
        data: LocalData,
        *,
        classes: np.ndarray,
        params: Mapping[str, Any],
    ) -> None:
        if data.X_train.ndim != 2:
            raise DataError(
                f"SGDClassifier needs features [n, d], the data is {list(data.X_train.shape)}: "
                "use fedge agent run --flatten"
            )
        if not np.issubdtype(data.y_train.dtype, np.integer):
            raise DataError("SGDClassifier classifies: y must hold integer class labels")
        want = sgd_model(int(data.X_train.shape[1]), len(classes))
        if "spec" not in model or ModelSpec.from_dict(model["spec"]) != ModelSpec.from_dict(
            want["spec"]
        ):
            raise DataError(f"the task's model must be {want} for these data and classes")
        unknown = np.setdiff1d(np.unique(data.y_train), classes)
        if unknown.size:
            raise DataError(f"labels {unknown.tolist()[:5]} are not among the classes")
        self.data = data
        # float64 like the coefficients (scikit-learn refuses to mix float32 data in)
        self.X = data.X_train.astype(np.float64)
        self.X_eval = data.X_eval.astype(np.float64)
        self.classes = classes
        self.params = dict(params)

    def _classifier(self, weights: Weights, config: TrainingConfig, seed: int) -> SGDClassifier:
        clf = SGDClassifier(
            **{"learning_rate": "constant", "eta0": config.lr, **self.params},
            random_state=seed,
        )
        clf.coef_ = np.array(weights["coef"], dtype=np.float64)
        clf.intercept_ = np.array(weights["intercept"], dtype=np.float64)
        clf.classes_ = self.classes
        return clf

    def train(
        self,
        weights: Weights,
        config: Mapping[str, Any],
        rng: np.random.Generator,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        cfg = TrainingConfig.from_mapping(config)
        clf = self._classifier(weights, cfg, int(rng.integers(2**31 - 1)))
        X, y = self.X, self.data.y_train
        n, steps, stopped = X.shape[0], 0, False
        for _ in range(cfg.epochs):
            order = rng.permutation(n)
            for start in range(0, n, cfg.batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                idx = order[start : start + cfg.batch_size]
                clf.partial_fit(X[idx], y[idx], classes=self.classes)
                steps += 1
            if stopped:
                break
        out = {
            "coef": clf.coef_.astype(np.float32),
            "intercept": clf.intercept_.astype(np.float32),
        }
        metrics = {"train_accuracy": float(clf.score(X, y)), "steps": float(steps)}
        return TrainResult(out, n, metrics=metrics, stopped=stopped)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Accuracy and macro F1 on the held-out examples (empty when there are none)."""
        if self.data.X_eval.shape[0] == 0:
            return {}
        clf = self._classifier(weights, TrainingConfig(), 0)
        predicted = clf.predict(self.X_eval)
        return {
            "eval_accuracy": float((predicted == self.data.y_eval).mean()),
            "num_eval_examples": float(self.data.X_eval.shape[0]),
            "macro_f1": float(
                f1_score(self.data.y_eval, predicted, average="macro", zero_division=0)
            ),
        }


def sgd_classifier(classes: Iterable[int], **params: Any) -> TrainerFactory:
    """A trainer factory for ``SGDClassifier(**params)`` over ``classes`` (all of the task's
    classes: a device may hold only some of them)."""
    labels = np.array(sorted(int(c) for c in classes), dtype=np.int64)
    if labels.size < 2:
        raise ValueError("an SGDClassifier task needs at least two classes")

    def factory(model: Mapping[str, Any], data: LocalData) -> Trainer:
        return SGDTrainer(model, data, classes=labels, params=params)

    return factory
