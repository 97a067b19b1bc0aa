"""The norm bound's arithmetic and settings (fedge.coordinator.engine.bounds) on their own:
the norm of a decoded update, the clip factor, the bound the next aggregation applies, the
adaptive step of Andrew et al. (2021), and what ``aggregation.norm_bound`` accepts. The
bound at work in rounds is tested in test_norm_bound.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from fedge.coordinator.engine import bounds
from fedge.coordinator.engine.bounds import AdaptiveNormBound, NormBoundConfig
from fedge.shared.wire import DecodedUpdate
from fedge.shared.wire_update import DecodedTensor


def _update(*values: list[float]) -> DecodedUpdate:
    tensors = [
        DecodedTensor(f"t{i}", (len(v) + 3,), np.arange(len(v)), np.asarray(v, np.float32))
        for i, v in enumerate(values)
    ]
    return DecodedUpdate(1, 0, 10, 8, 64, 0.5, tensors)


def test_the_norm_covers_every_tensor_in_float64() -> None:
    assert bounds.update_norm(_update([3.0], [], [4.0, 12.0])) == 13.0
    assert bounds.update_norm(_update([], [])) == 0.0
    # float32 squares of 1e20 overflow; the norm is taken in float64.
    huge = bounds.update_norm(_update([1e20, -1e20]))
    assert huge == pytest.approx(math.sqrt(2) * float(np.float32(1e20)), rel=1e-15)


@pytest.mark.parametrize(
    ("norm", "bound", "scale"),
    [(5.0, None, 1.0), (5.0, 10.0, 1.0), (10.0, 10.0, 1.0), (40.0, 10.0, 0.25), (0.0, 1.0, 1.0)],
)
def test_clip_scale(norm: float, bound: float | None, scale: float) -> None:
    assert bounds.clip_scale(norm, bound) == scale


def _adaptive(**kw: float) -> NormBoundConfig:
    return NormBoundConfig(max_norm=10.0, adaptive=AdaptiveNormBound(**kw))


def test_the_bound_the_next_aggregation_applies() -> None:
    fixed = NormBoundConfig(max_norm=10.0)
    assert bounds.current_bound(None, 3.0) is None
    assert bounds.current_bound(fixed, 3.0) == 10.0  # a stored value means nothing when fixed
    adaptive = _adaptive(initial=2.0)
    assert bounds.current_bound(adaptive, None) == 2.0
    assert bounds.current_bound(adaptive, math.inf) == 2.0
    assert bounds.current_bound(adaptive, math.nan) == 2.0
    assert bounds.current_bound(adaptive, 3.5) == 3.5
    assert bounds.current_bound(adaptive, 50.0) == 10.0  # never above max_norm
    assert bounds.current_bound(adaptive, 1e-20) == bounds.MIN_ADAPTIVE_BOUND == 1e-12
    assert bounds.current_bound(_adaptive(), None) == 10.0  # no initial: max_norm


def test_the_adaptive_step() -> None:
    cfg = _adaptive(quantile=0.25, lr=0.2)
    norms = [0.5, 1.0, 2.0, 3.0]  # half within the bound 1.0 (a norm equal to it counts)
    assert bounds.adapt(cfg, 1.0, norms) == pytest.approx(math.exp(-0.2 * (0.5 - 0.25)))
    assert bounds.adapt(cfg, 1.0, [5.0]) == pytest.approx(math.exp(0.2 * 0.25))
    assert bounds.adapt(cfg, 1.0, [0.1]) == pytest.approx(math.exp(-0.2 * 0.75))
    assert bounds.adapt(cfg, 9.9, [50.0]) == 10.0  # capped at max_norm
    assert bounds.adapt(cfg, 1e-12, [0.0]) == 1e-12  # floored
    # Nothing to store: no bound, a fixed one, no bound applied, no updates.
    assert bounds.adapt(None, 1.0, norms) is None
    assert bounds.adapt(NormBoundConfig(max_norm=10.0), 1.0, norms) is None
    assert bounds.adapt(cfg, None, norms) is None
    assert bounds.adapt(cfg, 1.0, []) is None


def test_defaults() -> None:
    cfg = NormBoundConfig(max_norm=3.0, adaptive={})
    assert cfg.action == "clip"
    assert cfg.adaptive == AdaptiveNormBound(quantile=0.5, lr=0.2, initial=None)
    assert cfg.initial_bound == 3.0
    assert NormBoundConfig(max_norm=3.0, adaptive={"initial": 3.0}).initial_bound == 3.0
    assert NormBoundConfig(max_norm=3.0, action="refuse").adaptive is None


def _refused(**body: object) -> str:
    with pytest.raises(ValidationError) as err:
        NormBoundConfig(**body)
    return str(err.value)


def _error(**body: object) -> tuple[tuple[str | int, ...], str, dict[str, object]]:
    """The one error pydantic finds in ``body``: where, its type and its limit."""
    with pytest.raises(ValidationError) as err:
        NormBoundConfig(**body)
    [error] = err.value.errors()
    return error["loc"], error["type"], dict(error.get("ctx", {}))


def test_settings_at_their_limits_are_accepted() -> None:
    NormBoundConfig(max_norm=bounds.MAX_BOUND, adaptive={"lr": 10.0, "initial": 1e300})
    assert bounds.MAX_BOUND == 1e300


@pytest.mark.parametrize(
    ("body", "loc", "kind", "ctx"),
    [
        ({"max_norm": 1.0000001e300}, ("max_norm",), "less_than_equal", {"le": 1e300}),
        ({"max_norm": 0.0}, ("max_norm",), "greater_than", {"gt": 0}),
        ({"adaptive": {"lr": 10.000001}}, ("adaptive", "lr"), "less_than_equal", {"le": 10}),
        ({"adaptive": {"lr": 0.0}}, ("adaptive", "lr"), "greater_than", {"gt": 0}),
        ({"adaptive": {"quantile": 0.0}}, ("adaptive", "quantile"), "greater_than", {"gt": 0}),
        ({"adaptive": {"quantile": 1.0}}, ("adaptive", "quantile"), "less_than", {"lt": 1}),
        ({"adaptive": {"initial": 0.0}}, ("adaptive", "initial"), "greater_than", {"gt": 0}),
        (
            {"adaptive": {"initial": 1.0000001e300}},
            ("adaptive", "initial"),
            "less_than_equal",
            {"le": 1e300},
        ),
        # strict: no strings
        ({"adaptive": {"lr": "1"}}, ("adaptive", "lr"), "float_type", {}),
        ({"adaptive": {"quantile": "0.5"}}, ("adaptive", "quantile"), "float_type", {}),
        ({"adaptive": {"initial": "2"}}, ("adaptive", "initial"), "float_type", {}),
        ({"max_norm": "1.0"}, ("max_norm",), "float_type", {}),
        ({"bound": 2.0}, ("bound",), "extra_forbidden", {}),
    ],
)
def test_settings_beyond_their_limits_are_refused(
    body: dict[str, object], loc: tuple[str, ...], kind: str, ctx: dict[str, object]
) -> None:
    assert _error(**{"max_norm": 1.0, **body}) == (loc, kind, ctx)


def test_an_unknown_action_is_refused() -> None:
    assert _error(max_norm=1.0, action="drop")[:2] == (("action",), "literal_error")


def test_inconsistent_settings_are_refused_with_a_reason() -> None:
    assert (
        "an adaptive bound needs action 'clip': a bound that follows a quantile of the norms "
        "would refuse a fixed share of honest updates"
    ) in _refused(max_norm=1.0, action="refuse", adaptive={})
    assert "adaptive.initial (2.5) must not exceed max_norm (2.0)" in _refused(
        max_norm=2.0, adaptive={"initial": 2.5}
    )
