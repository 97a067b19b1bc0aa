"""The scikit-learn adapter (fedge.edge_agent.sklearn_adapter): an SGDClassifier's coef_ and
intercept_ as the task's tensors, trained with partial_fit, locally and over HTTPS."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_agent.data import DataError, LocalData
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sklearn_adapter import sgd_classifier, sgd_initial_weights, sgd_model
from fedge.shared.wire import decode_model, encode_model
from tests.edge_agent.conftest import LiveCoordinator, shard, wait_for

trainer = sgd_classifier(classes=range(10), loss="log_loss", alpha=1e-4)


@pytest.fixture(scope="module")
def digits() -> LocalData:
    ds = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    return LocalData(ds.X_train, ds.y_train, ds.X_test, ds.y_test)


def test_partial_fit_trains_from_the_given_weights(digits: LocalData) -> None:
    model = sgd_model(64, 10)
    w0 = sgd_initial_weights(64, 10)
    t = trainer(model, digits)
    assert t.evaluate(w0)["eval_accuracy"] < 0.2  # zeros predict one class
    result = t.train(w0, {"epochs": 2, "batch_size": 32, "lr": 0.01}, np.random.default_rng(1))
    assert result.weights["coef"].shape == (10, 64) and result.weights["coef"].dtype == np.float32
    after = t.evaluate(result.weights)
    assert after["eval_accuracy"] > 0.85 and 0.8 < after["macro_f1"] <= 1.0
    assert result.metrics["steps"] == 2 * -(-digits.num_train // 32)
    # the starting point matters: training on from the result goes further, not from zero
    again = t.train(result.weights, {"epochs": 1, "lr": 1e-9}, np.random.default_rng(2))
    np.testing.assert_allclose(again.weights["coef"], result.weights["coef"], atol=1e-5)


def test_binary_tasks_have_one_row_like_scikit_learn() -> None:
    assert sgd_model(5, 2)["spec"][0]["shape"] == [1, 5]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    data = LocalData(X[:150], y[:150], X[150:], y[150:])
    t = sgd_classifier([0, 1])(sgd_model(5, 2), data)
    result = t.train(sgd_initial_weights(5, 2), {"epochs": 3, "lr": 0.01}, rng)
    assert t.evaluate(result.weights)["eval_accuracy"] > 0.9


def test_what_it_cannot_train_is_refused_clearly(digits: LocalData) -> None:
    images = LocalData(
        digits.X_train.reshape(-1, 1, 8, 8), digits.y_train, digits.X_eval, digits.y_eval
    )
    with pytest.raises(DataError, match=r"features \[n, d\]"):
        trainer(sgd_model(64, 10), images)
    with pytest.raises(DataError, match="model must be"):
        trainer(sgd_model(32, 10), digits)
    with pytest.raises(DataError, match="not among the classes"):
        sgd_classifier(classes=range(5))(sgd_model(64, 5), digits)


def test_a_task_federates_an_sgd_classifier_over_https(
    live: LiveCoordinator, digits: LocalData
) -> None:
    ds = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    agents = [live.agent(live.enroll(f"sk{i}", seed=i), shard(ds, i, size=300)) for i in range(2)]
    threads = [live.start(agent, max_rounds=2) for agent in agents]
    task = live.create_task(
        model=sgd_model(64, 10),
        aggregation={"clients_per_round": 2, "min_updates": 2, "num_rounds": 2},
        compression={"topk_fraction": 1.0, "bits": 8},
        training={"trainer": f"{__name__}:trainer", "epochs": 2, "lr": 0.01},
        start=False,
    )
    live.admin.upload_initial_model(task["id"], encode_model(sgd_initial_weights(64, 10)))
    live.admin.start_task(task["id"])
    wait_for(lambda: live.task(task["id"])["status"] == "completed", timeout=60, what="task")
    live.finish(threads)
    rounds = live.rounds(task["id"])
    assert all("macro_f1" in r["metrics"] for r in rounds)
    final = decode_model(live.admin.download_model(task["id"], "latest"))
    clf_scores = ds.X_test @ final["coef"].T + final["intercept"]
    assert float((clf_scores.argmax(axis=1) == ds.y_test).mean()) > 0.8
