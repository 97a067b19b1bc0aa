"""A task's aggregation settings as a typed, validated value.

``Task.aggregation`` is stored as JSON (validated by the task API when the task is created).
The engine parses it again with :meth:`AggregationConfig.from_dict` so that every default and
bound is applied in one place; a stored config that no longer parses fails the task with a
clear reason instead of crashing the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator.engine.staleness import StalenessConfig

Mode = Literal["sync", "async"]
Weighting = Literal["num_examples", "equal"]

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi")
#: The largest finite float32: no decoded update value exceeds it, so as ``max_update_abs``
#: it switches the per-value bound off (the aggregate's finite check still applies).
FLOAT32_MAX = 3.4028234663852886e38
#: Defaults of the update bounds (docs/rounds.md, "Update bounds").
MAX_UPDATE_ABS = 1e6
MAX_NUM_EXAMPLES = 10_000_000
#: ``max_num_examples`` stays an integer that float64 weights represent exactly.
NUM_EXAMPLES_LIMIT = 2**53


class ConfigError(ValueError):
    """An aggregation config that cannot be used; the message names the field."""


def _number(data: Mapping[str, Any], key: str, default: float, *, lo: float, hi: float) -> float:
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"aggregation.{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"aggregation.{key} must be in [{lo}, {hi}], got {value}")
    return value


def _integer(data: Mapping[str, Any], key: str, default: int, *, lo: int, hi: int) -> int:
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"aggregation.{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"aggregation.{key} must be in [{lo}, {hi}], got {value}")
    return value


def _choice(data: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = data.get(key, default)
    if value is None:
        value = default
    if value not in allowed:
        raise ConfigError(f"aggregation.{key} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def _target(data: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The early-stop target: stored flat (``target_metric: "accuracy"``, ``target_value``)
    as the task API writes it, or as the API's object ``{"name": ..., "value": ...}``."""
    name: Any = data.get("target_metric")
    value: Any = data.get("target_value")
    if isinstance(name, Mapping):
        name, value = name.get("name", "accuracy"), name.get("value")
    if name is None:
        return None, None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"aggregation.target_metric must be a metric name, got {name!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"aggregation target value must be a number, got {value!r}")
    return name, float(value)


@dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """How rounds of one task run. Field meanings: docs/rounds.md and docs/protocol.md."""

    mode: Mode = "sync"
    strategy: str = "fedavg"
    num_rounds: int = 20
    clients_per_round: int = 10
    over_selection: float = 0.3
    min_updates: int = 1
    round_deadline_s: float = 60.0
    lease_s: float = 120.0
    max_staleness: int = 4
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    weighting: Weighting = "num_examples"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_eps: float = 1e-3
    buffer_size: int = 10
    max_concurrency: int = 20
    target_metric: str | None = None
    target_value: float | None = None
    eval_every: int = 1
    max_update_abs: float = MAX_UPDATE_ABS
    max_num_examples: int = MAX_NUM_EXAMPLES

    @property
    def num_selected(self) -> int:
        """Devices picked for a sync round: ``ceil(clients_per_round * (1 + over_selection))``."""
        # Round first so 10 * 1.3 = 13.000000000000002 does not become 14.
        return math.ceil(round(self.clients_per_round * (1.0 + self.over_selection), 9))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggregationConfig:
        """Parse and validate; unknown keys are ignored (they belong to other versions)."""
        if not isinstance(data, Mapping):
            raise ConfigError("aggregation must be an object")
        cpr = _integer(data, "clients_per_round", 10, lo=1, hi=100_000)
        min_updates = _integer(data, "min_updates", 1, lo=1, hi=100_000)
        if min_updates > cpr:
            raise ConfigError(
                f"aggregation.min_updates ({min_updates}) exceeds clients_per_round ({cpr})"
            )
        deadline = _number(data, "round_deadline_s", 60.0, lo=0.05, hi=7 * 86400.0)
        target_metric, target_value = _target(data)
        staleness = data.get("staleness") or {}
        try:
            staleness_cfg = StalenessConfig.from_dict(staleness)
        except ValueError as exc:
            raise ConfigError(f"aggregation.staleness: {exc}") from None
        return cls(
            mode=_choice(data, "mode", "sync", ("sync", "async")),  # type: ignore[arg-type]
            strategy=_choice(data, "strategy", "fedavg", STRATEGIES),
            num_rounds=_integer(data, "num_rounds", 20, lo=1, hi=10_000_000),
            clients_per_round=cpr,
            over_selection=_number(data, "over_selection", 0.3, lo=0.0, hi=10.0),
            min_updates=min_updates,
            round_deadline_s=deadline,
            lease_s=_number(data, "lease_s", max(120.0, deadline), lo=0.05, hi=7 * 86400.0),
            max_staleness=_integer(data, "max_staleness", 4, lo=0, hi=1_000_000),
            staleness=staleness_cfg,
            weighting=_choice(  # type: ignore[arg-type]
                data, "weighting", "num_examples", ("num_examples", "equal")
            ),
            server_lr=_number(data, "server_lr", 1.0, lo=0.0, hi=1e6),
            server_momentum=_number(data, "server_momentum", 0.0, lo=0.0, hi=0.999999),
            server_beta1=_number(data, "server_beta1", 0.9, lo=0.0, hi=0.999999),
            server_beta2=_number(data, "server_beta2", 0.99, lo=0.0, hi=0.999999),
            server_eps=_number(data, "server_eps", 1e-3, lo=1e-12, hi=1.0),
            buffer_size=_integer(data, "buffer_size", 10, lo=1, hi=100_000),
            max_concurrency=_integer(data, "max_concurrency", 20, lo=1, hi=1_000_000),
            target_metric=target_metric,
            target_value=target_value,
            eval_every=_integer(data, "eval_every", 1, lo=1, hi=10_000_000),
            max_update_abs=_number(
                data, "max_update_abs", MAX_UPDATE_ABS, lo=1e-12, hi=FLOAT32_MAX
            ),
            max_num_examples=_integer(
                data, "max_num_examples", MAX_NUM_EXAMPLES, lo=1, hi=NUM_EXAMPLES_LIMIT
            ),
        )
