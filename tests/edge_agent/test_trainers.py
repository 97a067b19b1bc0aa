"""Built-in numpy trainers on real digits data."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_agent.data import DataError, LocalData, load_arrays, split_local
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.trainers import (
    NumpyTrainer,
    TrainingConfig,
    _loss_and_grads,
    load_trainer_factory,
)
from fedge.shared import architectures

SOFTMAX = {"architecture": "softmax", "input_dim": 64, "num_classes": 10}
MLP = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [32]}


@pytest.fixture(scope="module")
def digits() -> LocalData:
    ds = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    return LocalData(ds.X_train, ds.y_train, ds.X_test, ds.y_test)


@pytest.mark.parametrize("model", [SOFTMAX, MLP], ids=["softmax", "mlp"])
def test_training_lowers_the_loss_and_raises_accuracy(digits, model):
    trainer = NumpyTrainer(model, digits)
    w0 = architectures.init_weights(model, np.random.default_rng(0))
    before = trainer.evaluate(w0)
    result = trainer.train(w0, {"epochs": 2, "batch_size": 32, "lr": 0.1}, np.random.default_rng(1))
    after = trainer.evaluate(result.weights)
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] > 0.85
    assert result.num_examples == digits.num_train
    assert result.metrics["steps"] == 2 * -(-digits.num_train // 32)
    assert not result.stopped
    # the base weights are not modified in place
    np.testing.assert_array_equal(w0["b"] if "b" in w0 else w0["b0"], 0)


@pytest.mark.parametrize("model", [SOFTMAX, MLP], ids=["softmax", "mlp"])
def test_gradients_match_finite_differences(model):
    rng = np.random.default_rng(3)
    layers = architectures.layers(model)
    w = {
        k: v.astype(np.float64) + rng.normal(scale=0.1, size=v.shape)
        for k, v in architectures.init_weights(model, rng).items()
    }
    X = rng.normal(size=(6, 64))
    y = rng.integers(0, 10, size=6)
    _, grads = _loss_and_grads(layers, w, X, y)
    for name in w:
        flat = w[name].reshape(-1)
        for i in rng.choice(flat.size, size=3, replace=False):
            old = flat[i]
            flat[i] = old + 1e-5
            up, _ = _loss_and_grads(layers, w, X, y)
            flat[i] = old - 1e-5
            down, _ = _loss_and_grads(layers, w, X, y)
            flat[i] = old
            numeric = (up - down) / 2e-5
            assert grads[name].reshape(-1)[i] == pytest.approx(numeric, rel=1e-3, abs=1e-5)


def test_training_is_deterministic_for_a_seed(digits):
    trainer = NumpyTrainer(SOFTMAX, digits)
    w0 = architectures.init_weights(SOFTMAX, np.random.default_rng(0))
    a = trainer.train(w0, {"epochs": 1}, np.random.default_rng(5)).weights
    b = trainer.train(w0, {"epochs": 1}, np.random.default_rng(5)).weights
    c = trainer.train(w0, {"epochs": 1}, np.random.default_rng(6)).weights
    np.testing.assert_array_equal(a["W"], b["W"])
    assert not np.array_equal(a["W"], c["W"])


def test_fedprox_term_pulls_towards_the_base_weights(digits):
    trainer = NumpyTrainer(MLP, digits)
    w0 = architectures.init_weights(MLP, np.random.default_rng(0))
    config = {"epochs": 2, "batch_size": 32, "lr": 0.1}

    def distance(mu: float) -> float:
        result = trainer.train(w0, config | {"proximal_mu": mu}, np.random.default_rng(1))
        return float(sum(np.sum((result.weights[k] - w0[k]) ** 2) for k in w0))

    plain, prox, strong = distance(0.0), distance(1.0), distance(5.0)
    assert strong < prox < plain


def test_should_stop_is_checked_between_minibatches(digits):
    trainer = NumpyTrainer(SOFTMAX, digits)
    w0 = architectures.init_weights(SOFTMAX, np.random.default_rng(0))
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    result = trainer.train(
        w0, {"epochs": 5, "batch_size": 8}, np.random.default_rng(0), should_stop=should_stop
    )
    assert result.stopped
    assert result.metrics["steps"] == 3


def test_evaluate_without_eval_data_is_empty(digits):
    data = LocalData(digits.X_train[:20], digits.y_train[:20], digits.X_eval[:0], digits.y_eval[:0])
    trainer = NumpyTrainer(SOFTMAX, data)
    assert trainer.evaluate(architectures.init_weights(SOFTMAX, np.random.default_rng(0))) == {}


def test_data_that_does_not_fit_the_model_is_refused(digits):
    with pytest.raises(ValueError, match=r"shape \[n, 30\]"):
        NumpyTrainer({"architecture": "softmax", "input_dim": 30, "num_classes": 10}, digits)


@pytest.mark.parametrize(
    "config",
    [{"epochs": 0}, {"batch_size": -1}, {"lr": 0}, {"lr": "fast"}, {"proximal_mu": -1}],
)
def test_bad_training_config(config):
    with pytest.raises(ValueError, match="training"):
        TrainingConfig.from_mapping(config)


def test_user_trainer_factory_by_entry_point():
    factory = load_trainer_factory("fedge.edge_agent.trainers:builtin_trainer")
    data = split_local(
        np.zeros((10, 64), np.float32),
        np.zeros(10, np.int64),
        eval_fraction=0.2,
        rng=np.random.default_rng(0),
    )
    assert isinstance(factory(SOFTMAX, data), NumpyTrainer)
    assert load_trainer_factory(None)(SOFTMAX, data).__class__ is NumpyTrainer


def test_the_builtin_trainer_says_what_it_needs_of_images_and_regression_targets(digits):
    images = LocalData(
        digits.X_train.reshape(-1, 1, 8, 8), digits.y_train, digits.X_eval, digits.y_eval
    )
    with pytest.raises(DataError, match=r"2-D features \[n, d\], the data is \[\d+, 1, 8, 8\]"):
        NumpyTrainer(SOFTMAX, images)
    targets = digits.y_train.astype(np.float32) + 0.5
    regression = LocalData(digits.X_train, targets, digits.X_eval, digits.y_eval)
    with pytest.raises(DataError, match="float targets"):
        NumpyTrainer(SOFTMAX, regression)


def test_flattened_images_and_integral_float_labels_train(digits, tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, X=digits.X_train.reshape(-1, 1, 8, 8), y=digits.y_train.astype(np.float64))
    X, y = load_arrays(str(path), flatten=True)
    assert y.dtype == np.float32
    data = split_local(X, y, eval_fraction=0.2, rng=np.random.default_rng(0))
    trainer = NumpyTrainer(SOFTMAX, data)
    w0 = architectures.init_weights(SOFTMAX, np.random.default_rng(0))
    result = trainer.train(w0, {"epochs": 1, "lr": 0.1}, np.random.default_rng(1))
    assert trainer.evaluate(result.weights)["eval_accuracy"] > 0.8
