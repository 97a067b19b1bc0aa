"""The PyTorch adapter (fedge.edge_agent.torch_adapter) on real digits: weights by state_dict
name, buffers, training, regression targets, files. Skips without the torch extra (fails in
CI, tests/support/torch_support.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tests.support.torch_support import require_torch

torch = require_torch()

from torch import nn  # noqa: E402

from fedge.edge_agent.data import DataError, LocalData, load_arrays  # noqa: E402
from fedge.edge_agent.sim.datasets import load_dataset  # noqa: E402
from fedge.edge_agent.torch_adapter import (  # noqa: E402
    federate,
    init_model,
    load_into,
    load_weights,
    module_spec,
    module_weights,
    read_state_dict,
    save_state_dict,
)
from fedge.shared.modelfiles import write_model_file  # noqa: E402


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


@pytest.fixture(scope="module")
def images() -> LocalData:
    ds = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    return LocalData(
        ds.X_train.reshape(-1, 1, 8, 8), ds.y_train, ds.X_test.reshape(-1, 1, 8, 8), ds.y_test
    )


def test_the_spec_is_the_floating_state_dict_entries_in_order() -> None:
    module = small_cnn()
    spec = module_spec(module)
    assert spec.names == (
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "4.weight",
        "4.bias",
    )  # 1.num_batches_tracked (int64) is not part of the task
    assert dict((t.name, t.shape) for t in spec.tensors)["0.weight"] == (4, 1, 3, 3)


def test_weights_go_in_and_out_by_name_and_integer_buffers_stay() -> None:
    module = small_cnn()
    module.train()
    module(torch.zeros(2, 1, 8, 8))  # one step of BatchNorm bookkeeping
    rng = np.random.default_rng(1)
    weights = {
        n: rng.standard_normal(a.shape).astype(np.float32)
        for n, a in module_weights(module).items()
    }
    weights["1.running_var"] = np.abs(weights["1.running_var"])
    load_weights(module, weights)
    out = module_weights(module)
    assert all(out[n].tobytes() == w.tobytes() for n, w in weights.items())
    assert int(module.state_dict()["1.num_batches_tracked"]) == 1
    # a variance pushed below zero by lossy compression is clamped, nothing else is
    load_weights(module, {**weights, "1.running_var": np.array([-1e-3, 2, 0, 1], np.float32)})
    assert module_weights(module)["1.running_var"].tolist() == [0.0, 2.0, 0.0, 1.0]
    assert (module_weights(module)["1.running_mean"] < 0).any()
    with pytest.raises(ValueError, match="shape"):
        load_weights(module, {**weights, "4.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="missing"):
        load_weights(module, {n: w for n, w in weights.items() if n != "4.bias"})
    with pytest.raises(ValueError, match="lacks"):
        load_weights(module, {**weights, "extra": np.zeros(1, np.float32)})


def test_a_cnn_trains_on_images_and_its_batchnorm_statistics_travel(images: LocalData) -> None:
    model, w0 = init_model(small_cnn, seed=0)
    trainer = federate(small_cnn)(model, images)
    before = trainer.evaluate(w0)
    result = trainer.train(
        w0, {"epochs": 2, "batch_size": 32, "lr": 0.05}, np.random.default_rng(2)
    )
    after = trainer.evaluate(result.weights)
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] > 0.85 and after["num_eval_examples"] == len(images.y_eval)
    assert result.num_examples == images.num_train
    assert result.metrics["steps"] == 2 * -(-images.num_train // 32)
    # running statistics moved and are part of the update; the base was not modified
    assert not np.array_equal(result.weights["1.running_mean"], w0["1.running_mean"])
    assert np.array_equal(w0["1.running_mean"], np.zeros(4, np.float32))
    # the counter is the device's own: it kept counting in the trainer's module
    steps = int(trainer.module.state_dict()["1.num_batches_tracked"])  # type: ignore[attr-defined]
    assert steps == result.metrics["steps"]


def test_the_same_seed_trains_the_same_weights(images: LocalData) -> None:
    model, w0 = init_model(small_cnn, seed=3)
    assert all(
        a.tobytes() == b.tobytes()
        for a, b in zip(w0.values(), init_model(small_cnn, seed=3)[1].values(), strict=True)
    )
    runs = [
        federate(small_cnn)(model, images).train(w0, {"epochs": 1}, np.random.default_rng(4))
        for _ in range(2)
    ]
    assert all(np.array_equal(runs[0].weights[n], runs[1].weights[n]) for n in w0)


def test_training_stops_between_minibatches(images: LocalData) -> None:
    model, w0 = init_model(small_cnn)
    calls = []
    result = federate(small_cnn)(model, images).train(
        w0,
        {"epochs": 3},
        np.random.default_rng(0),
        should_stop=lambda: calls.append(1) or len(calls) > 2,
    )
    assert result.stopped and result.metrics["steps"] == 2


def test_regression_targets_train_with_mean_squared_error() -> None:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((400, 2, 3)).astype(np.float32)  # N-D features
    coef = rng.standard_normal(6).astype(np.float32)
    y = (X.reshape(400, -1) @ coef + 0.5).astype(np.float32)
    data = LocalData(X[:300], y[:300], X[300:], y[300:])

    def build() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(6, 1))

    model, w0 = init_model(build)
    trainer = federate(build)(model, data)
    before = trainer.evaluate(w0)
    result = trainer.train(w0, {"epochs": 20, "batch_size": 16, "lr": 0.05}, rng)
    after = trainer.evaluate(result.weights)
    assert "eval_accuracy" not in after
    assert after["eval_loss"] < 0.01 * before["eval_loss"]
    np.testing.assert_allclose(result.weights["1.weight"].ravel(), coef, atol=0.05)


def test_extra_metrics_join_the_evaluation(images: LocalData) -> None:
    def metrics(y_true: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return {"mean_logit": float(outputs.mean()), "n": float(y_true.size)}

    model, w0 = init_model(small_cnn)
    got = federate(small_cnn, metrics=metrics)(model, images).evaluate(w0)
    assert got["n"] == len(images.y_eval) and np.isfinite(got["mean_logit"])


def test_a_task_for_another_module_is_refused_clearly(images: LocalData) -> None:
    model, _ = init_model(small_cnn)
    model["spec"][0]["shape"] = [8, 1, 3, 3]
    with pytest.raises(DataError, match=r"does not match the module: 0.weight \[8, 1, 3, 3\]"):
        federate(small_cnn)(model, images)
    with pytest.raises(DataError, match="given by 'spec'"):
        federate(small_cnn)({"architecture": "softmax"}, images)


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_a_downloaded_file_loads_into_the_module_in_one_call(tmp_path, suffix: str) -> None:
    _, weights = init_model(small_cnn, seed=7)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        save_state_dict(path, weights)
    else:
        write_model_file(path, weights, fmt=suffix[1:], model={"spec": []})
    module = load_into(small_cnn(), path)
    assert not module.training
    got = module_weights(module)
    assert all(got[n].tobytes() == w.tobytes() for n, w in weights.items())


def test_a_state_dict_file_is_read_without_unpickling_code(tmp_path) -> None:
    path = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled",))

    path.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(ValueError, match="not a readable state_dict"):
        read_state_dict(path)
    torch.save({"w": torch.ones(2), "steps": torch.tensor(3)}, str(path))
    assert list(read_state_dict(path)) == ["w"]  # integer tensors are not weights


def loader():
    """A data entry point returning a DataLoader (fedge agent run --data module:loader)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    X = torch.rand(10, 1, 8, 8, generator=g)
    y = torch.arange(10) % 3
    return DataLoader(TensorDataset(X, y), batch_size=4)


def test_a_dataloader_is_a_data_source() -> None:
    X, y = load_arrays(f"{__name__}:loader")
    assert X.shape == (10, 1, 8, 8) and X.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
