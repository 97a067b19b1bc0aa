"""One task configuration: the API's schema and the round engine's parser agree.

A task body's ``aggregation`` is validated by the API (``TaskCreate``), stored as JSON
(``fedge.coordinator.tasks.aggregation_to_stored``) and parsed again by the engine on every tick
(``AggregationConfig.from_dict``). The property below draws configurations across each
field's bounds, read from the API's JSON schema (the bounds themselves, the next float inside
and outside, values within, wrong types), and checks that

- the API accepts a configuration exactly when the engine does, and
- for an accepted one, the engine's values (defaults included), parsed from the body and from
  what the API stores, equal the API's validated values.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from fedge.coordinator.engine.config import AggregationConfig as EngineConfig
from fedge.coordinator.engine.config import ConfigError
from fedge.coordinator.engine.staleness import StalenessConfig as EngineStaleness
from fedge.coordinator.schemas.tasks import AggregationConfig as ApiConfig
from fedge.coordinator.schemas.tasks import StalenessConfig as ApiStaleness
from fedge.coordinator.schemas.tasks import TaskCreate
from fedge.coordinator.tasks import aggregation_to_stored

MODEL = {"architecture": "softmax", "input_dim": 4, "num_classes": 2}
SCHEMA = ApiConfig.model_json_schema()
#: Values of the wrong JSON type for every kind of field.
WRONG_TYPES: list[Any] = [None, True, False, "1", [], {}]

# ------------------------------------------------------------------ drawing from the schema


def _resolve(prop: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in prop:
        return SCHEMA["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
    return prop


def _number_bounds(prop: dict[str, Any]) -> tuple[float, bool, float, bool]:
    """``(lo, lo_exclusive, hi, hi_exclusive)``; every bounded number here has both ends."""
    lo, lo_ex = prop.get("minimum"), False
    if lo is None:
        lo, lo_ex = prop["exclusiveMinimum"], True
    hi, hi_ex = prop.get("maximum"), False
    if hi is None:
        hi, hi_ex = prop["exclusiveMaximum"], True
    return float(lo), lo_ex, float(hi), hi_ex


def _inside(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema allows, the bounds themselves among them."""
    kind = prop.get("type")
    if "enum" in prop:
        return st.sampled_from(prop["enum"])
    if kind == "integer":
        return st.sampled_from([prop["minimum"], prop["maximum"]]) | st.integers(
            prop["minimum"], prop["maximum"]
        )
    if kind == "number":
        if "minimum" not in prop and "exclusiveMinimum" not in prop:
            return st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)
        lo, lo_ex, hi, hi_ex = _number_bounds(prop)
        edges: list[float] = [
            math.nextafter(lo, math.inf) if lo_ex else lo,
            math.nextafter(hi, -math.inf) if hi_ex else hi,
        ]
        # JSON integers at the ends (an integer is a valid number)
        ints = [n for n in (math.ceil(edges[0]), math.floor(edges[1])) if edges[0] <= n <= edges[1]]
        within = st.floats(lo, hi, exclude_min=lo_ex, exclude_max=hi_ex)
        return st.sampled_from(edges + ints) | within
    if kind == "string":
        return st.from_regex(prop["pattern"], fullmatch=True).filter(
            lambda s: prop["minLength"] <= len(s) <= prop["maxLength"]
        )
    raise AssertionError(f"no strategy for {prop}")


def _outside(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values just beyond the schema's bounds, and values of a wrong type."""
    kind = prop.get("type")
    wrong = st.sampled_from(WRONG_TYPES)
    if "enum" in prop:
        return st.sampled_from(["", "bogus", prop["enum"][0].upper()]) | wrong
    if kind == "integer":
        imin, imax = int(prop["minimum"]), int(prop["maximum"])
        near: list[Any] = [imin - 1, imax + 1, float(imin), float(imax), imin + 0.5]
        return st.sampled_from(near) | wrong | st.integers(max_value=imin - 1)
    if kind == "number":
        odd = [math.nan, math.inf, -math.inf]
        if "minimum" not in prop and "exclusiveMinimum" not in prop:
            return st.sampled_from(odd) | wrong
        lo, lo_ex, hi, hi_ex = _number_bounds(prop)
        near = [
            lo if lo_ex else math.nextafter(lo, -math.inf),
            hi if hi_ex else math.nextafter(hi, math.inf),
            lo - 1.0,
            hi * 2.0,
        ]
        return st.sampled_from(near + odd) | wrong
    if kind == "string":
        return st.sampled_from(["", "a b", "x" * (prop["maxLength"] + 1), "é"]) | wrong
    raise AssertionError(f"no strategy for {prop}")


def _object(schema: dict[str, Any], *, bad: bool) -> st.SearchStrategy[dict[str, Any]]:
    """An object of the schema's fields (each optional unless required); with ``bad``, exactly
    one field is drawn outside its bounds (or a required one left out)."""
    props = schema["properties"]
    required = set(schema.get("required", ()))

    def good(name: str) -> st.SearchStrategy[Any]:
        return _field(props[name], bad=False)

    base = st.fixed_dictionaries(
        {n: good(n) for n in props if n in required},
        optional={n: good(n) for n in props if n not in required},
    )
    if not bad:
        return base

    @st.composite
    def spoiled(draw: st.DrawFn) -> dict[str, Any]:
        data = dict(draw(base))
        name = draw(st.sampled_from(sorted(props)))
        if name in required and draw(st.booleans()):
            del data[name]
        else:
            data[name] = draw(_field(props[name], bad=True))
        return data

    return spoiled()


def _field(prop: dict[str, Any], *, bad: bool) -> st.SearchStrategy[Any]:
    if "anyOf" in prop and not any("$ref" in p for p in prop["anyOf"]):
        # an optional scalar: null, or a value within its bounds
        inner = next(p for p in prop["anyOf"] if p.get("type") != "null")
        if bad:
            return _outside(inner).filter(lambda v: v is not None)
        return st.none() | _inside(inner)
    if "anyOf" in prop:  # an optional object: null, or the object
        obj = _resolve(next(p for p in prop["anyOf"] if "$ref" in p))
        if bad:
            return _object(obj, bad=True) | st.sampled_from(WRONG_TYPES[1:])
        return st.none() | _object(obj, bad=False)
    prop = _resolve(prop)
    if prop.get("type") == "object":
        return _object(prop, bad=bad) | (st.sampled_from(WRONG_TYPES[1:]) if bad else st.nothing())
    return _outside(prop) if bad else _inside(prop)


BODIES = _object(SCHEMA, bad=False) | _object(SCHEMA, bad=True)

# ------------------------------------------------------------------------- the two sides


def _api(body: dict[str, Any]) -> ApiConfig | None:
    """What the REST API makes of a task body's ``aggregation`` (None: 422)."""
    try:
        task = TaskCreate.model_validate({"name": "t", "model": MODEL, "aggregation": body})
    except ValidationError:
        return None
    return task.aggregation


def _engine(data: dict[str, Any]) -> EngineConfig | None:
    """What the round engine makes of a stored ``aggregation`` (None: the task fails)."""
    try:
        return EngineConfig.from_dict(data)
    except ConfigError:
        return None


def _plain(value: Any) -> Any:
    """A value with its type, nested configs as dicts, for an exact comparison."""
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in dict(value).items()}
    return (type(value).__name__, value)


def _values(cfg: BaseModel) -> dict[str, Any]:
    return {name: _plain(getattr(cfg, name)) for name in ApiConfig.model_fields}


# ------------------------------------------------------------------------------ properties


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_the_api_accepts_exactly_what_the_engine_accepts_with_equal_values(
    body: dict[str, Any],
) -> None:
    api = _api(body)
    engine = _engine(body)
    assert (api is None) == (engine is None), (
        f"API {'refuses' if api is None else 'accepts'}, "
        f"engine {'refuses' if engine is None else 'accepts'}: {body!r}"
    )
    if api is None or engine is None:
        return
    assert _values(engine) == _values(api)
    stored = _engine(aggregation_to_stored(api))
    assert stored is not None, aggregation_to_stored(api)
    assert _values(stored) == _values(api)


def test_the_defaults_are_one_set() -> None:
    assert _values(EngineConfig.from_dict({})) == _values(ApiConfig())
    assert _plain(EngineStaleness()) == _plain(ApiStaleness())
    assert _plain(EngineStaleness.from_dict({})) == _plain(ApiConfig().staleness)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_rounds", 1_000_001),
        ("over_selection", 5.5),
        ("server_lr", 0.0),
        ("server_momentum", 0.9999999),
        ("round_deadline_s", 0.01),
        ("max_concurrency", 100_001),
        ("buffer_size", True),
        ("staleness", {"function": "hinge", "a": 0.5, "b": 2.5}),
        ("target_metric", {"name": "top 1", "value": 0.5}),
    ],
)
def test_a_value_beyond_the_one_bound_is_named_by_both(key: str, value: Any) -> None:
    """The engine's ConfigError and the API's 422 name the field (fixed examples of the
    bounds that had drifted apart)."""
    with pytest.raises(ConfigError, match=f"aggregation.{key}"):
        EngineConfig.from_dict({key: value})
    with pytest.raises(ValidationError, match=key):
        TaskCreate.model_validate({"name": "t", "model": MODEL, "aggregation": {key: value}})
