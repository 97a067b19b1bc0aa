import numpy as np
import pytest

from fedge.shared import architectures as arch

SOFTMAX = {"architecture": "softmax", "input_dim": 5, "num_classes": 3, "hidden": [], "seed": 0}
MLP = {"architecture": "mlp", "input_dim": 5, "num_classes": 3, "hidden": [8, 4]}


def test_softmax_spec():
    spec = arch.build_spec(SOFTMAX)
    assert spec.to_dict() == [{"name": "W", "shape": [5, 3]}, {"name": "b", "shape": [3]}]


def test_mlp_spec_names_and_shapes():
    spec = arch.build_spec(MLP)
    assert spec.to_dict() == [
        {"name": "W0", "shape": [5, 8]},
        {"name": "b0", "shape": [8]},
        {"name": "W1", "shape": [8, 4]},
        {"name": "b1", "shape": [4]},
        {"name": "W2", "shape": [4, 3]},
        {"name": "b2", "shape": [3]},
    ]
    assert spec.num_params == 5 * 8 + 8 + 8 * 4 + 4 + 4 * 3 + 3


def test_explicit_spec_is_passed_through():
    spec = arch.build_spec({"spec": [{"name": "w", "shape": [2, 2]}]})
    assert spec.names == ("w",)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"architecture": "cnn", "input_dim": 5, "num_classes": 3}, "unknown model architecture"),
        (
            {"architecture": "softmax", "input_dim": 0, "num_classes": 3},
            "input_dim must be positive",
        ),
        (
            {"architecture": "softmax", "input_dim": 5, "num_classes": -1},
            "num_classes must be positive",
        ),
        ({"architecture": "softmax", "input_dim": 5.5, "num_classes": 3}, "must be an integer"),
        ({"architecture": "softmax", "input_dim": True, "num_classes": 3}, "must be an integer"),
        ({"architecture": "softmax", "num_classes": 3}, "input_dim must be an integer"),
        ({"architecture": "softmax", "input_dim": 5, "num_classes": 3, "hidden": [4]}, "no hidden"),
        (
            {"architecture": "mlp", "input_dim": 5, "num_classes": 3, "hidden": [4, 0]},
            r"hidden\[1\]",
        ),
        ({"architecture": "mlp", "input_dim": 5, "num_classes": 3, "hidden": 4}, "must be a list"),
        (
            {"architecture": "mlp", "input_dim": 100_000, "num_classes": 10, "hidden": [1000]},
            "parameters",
        ),
    ],
)
def test_bad_configs_are_refused_clearly(model, message):
    with pytest.raises(ValueError, match=message):
        arch.build_spec(model)


@pytest.mark.parametrize("model", [SOFTMAX, MLP])
def test_init_weights_match_spec_and_are_seeded(model):
    w1 = arch.init_weights(model, np.random.default_rng(7))
    w2 = arch.init_weights(model, np.random.default_rng(7))
    w3 = arch.init_weights(model, np.random.default_rng(8))
    arch.build_spec(model).check(w1)
    for name in w1:
        assert w1[name].dtype == np.float32
        np.testing.assert_array_equal(w1[name], w2[name])
    weight_names = [n for n in w1 if n.startswith("W")]
    assert any(not np.array_equal(w1[n], w3[n]) for n in weight_names)
    for name in w1:
        if name.startswith("b"):
            assert not w1[name].any()


def test_he_init_scale_for_hidden_layers():
    model = {"architecture": "mlp", "input_dim": 400, "num_classes": 10, "hidden": [300]}
    w = arch.init_weights(model, np.random.default_rng(0))
    assert w["W0"].std() == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    limit = np.sqrt(6 / (300 + 10))
    assert np.abs(w["W1"]).max() <= limit
    assert w["W1"].std() == pytest.approx(limit / np.sqrt(3), rel=0.1)


def test_he_normal_init_draws_every_layer_from_one_stream():
    """``init: he_normal``: every weight matrix He-normal, drawn in layer order from the seed's
    generator (the usual recipe, e.g. a numpy script's ``rng.standard_normal(shape) * sqrt(2 /
    fan_in)``), so those weights can be reproduced exactly."""
    model = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]}
    w = arch.init_weights({**model, "init": "he_normal"}, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    w0 = (rng.standard_normal((64, 128)) * np.sqrt(2.0 / 64)).astype(np.float32)
    w1 = (rng.standard_normal((128, 10)) * np.sqrt(2.0 / 128)).astype(np.float32)
    assert w["W0"].tobytes() == w0.tobytes() and w["W1"].tobytes() == w1.tobytes()
    default = arch.init_weights(model, np.random.default_rng(3))
    assert default["W0"].tobytes() == w0.tobytes() and default["W1"].tobytes() != w1.tobytes()
    with pytest.raises(ValueError, match="init must be one of"):
        arch.init_weights({**model, "init": "xavier"}, np.random.default_rng(3))


def test_generated_weights_follow_the_seed_of_built_in_models_only():
    for model in (SOFTMAX, MLP):
        want = arch.init_weights(model, np.random.default_rng(model.get("seed", 0)))
        got = arch.generated_weights(model)
        assert got is not None and all(got[k].tobytes() == want[k].tobytes() for k in want)
    seeded, plain = arch.generated_weights({**MLP, "seed": 4}), arch.generated_weights(MLP)
    assert seeded is not None and plain is not None
    assert seeded["W0"].tobytes() != plain["W0"].tobytes()
    assert arch.generated_weights({"spec": [{"name": "w", "shape": [2]}]}) is None
    assert arch.generated_weights({**MLP, "seed": -1}) is None


def test_forward_matches_a_manual_computation():
    rng = np.random.default_rng(1)
    w = arch.init_weights(MLP, rng)
    w = {k: v + rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in w.items()}
    X = rng.normal(size=(4, 5))
    h = np.maximum(X @ w["W0"] + w["b0"], 0)
    h = np.maximum(h @ w["W1"] + w["b1"], 0)
    expected = h @ w["W2"] + w["b2"]
    np.testing.assert_allclose(arch.forward(MLP, w, X), expected, rtol=1e-5, atol=1e-6)


def test_evaluate_is_stable_for_huge_logits():
    w = {"W": np.zeros((5, 3), np.float32), "b": np.array([1e4, 0, -1e4], np.float32)}
    X = np.zeros((2, 5))
    result = arch.evaluate(SOFTMAX, w, X, np.array([0, 1]))
    assert np.isfinite(result["loss"])
    assert result["loss"] == pytest.approx((0 + 1e4) / 2)
    assert result["accuracy"] == 0.5


def test_evaluate_uniform_model_has_log_c_loss():
    w = {"W": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32)}
    X = np.random.default_rng(0).normal(size=(10, 5))
    result = arch.evaluate(SOFTMAX, w, X, np.arange(10) % 3)
    assert result["loss"] == pytest.approx(np.log(3))


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.zeros((3, 4)), np.zeros(3, int), r"shape \[n, 5\]"),
        (np.zeros((3, 5)), np.zeros(2, int), r"y must have shape \[3\]"),
        (np.zeros((3, 5)), np.array([0, 1, 3]), "labels must lie"),
        (np.zeros((3, 5)), np.array([0.5, 1, 2]), "integer class labels"),
        (np.full((3, 5), np.nan), np.zeros(3, int), "NaN"),
        (np.zeros((0, 5)), np.zeros(0, int), "zero examples"),
    ],
)
def test_evaluate_rejects_bad_inputs(X, y, message):
    w = arch.init_weights(SOFTMAX, np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        arch.evaluate(SOFTMAX, w, X, y)
