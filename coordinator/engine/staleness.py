"""Staleness discounting: how much an update trained on an old model version counts.

``tau = version_being_built_on - base_version`` (0 for a fresh update). Functions:

- ``constant``: ``s(tau) = 1``;
- ``polynomial``: ``s(tau) = (1 + tau) ** -a``;
- ``hinge``: ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a * (tau - b) + 1)``.

An update's weight is ``num_examples * s(tau)`` (or ``s(tau)`` with equal weighting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

FUNCTIONS = ("constant", "polynomial", "hinge")
Function = Literal["constant", "polynomial", "hinge"]


@dataclass(frozen=True, kw_only=True)
class StalenessConfig:
    """A staleness function and its parameters (``a`` and ``b`` as in the formulas above)."""

    function: Function = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise ValueError(f"function must be one of {list(FUNCTIONS)}, got {self.function!r}")
        for name in ("a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StalenessConfig:
        if not isinstance(data, Mapping):
            raise ValueError("must be an object like {'function': 'polynomial', 'a': 0.5}")
        unknown = sorted(str(k) for k in data if k not in ("function", "a", "b"))
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        return cls(**{str(k): v for k, v in data.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.function, "a": self.a, "b": self.b}


def staleness_factor(config: StalenessConfig, tau: int) -> float:
    """``s(tau)`` in (0, 1]; ``tau`` must be >= 0."""
    if tau < 0:
        raise ValueError(f"staleness cannot be negative, got {tau}")
    if config.function == "constant":
        return 1.0
    if config.function == "polynomial":
        return float((1.0 + tau) ** -config.a)
    if tau <= config.b:
        return 1.0
    return 1.0 / (config.a * (tau - config.b) + 1.0)


def update_weight(
    config: StalenessConfig, *, tau: int, num_examples: int, weighting: str = "num_examples"
) -> float:
    """The aggregation weight of one update: ``num_examples * s(tau)`` or ``s(tau)``."""
    factor = staleness_factor(config, tau)
    if weighting == "equal":
        return factor
    return float(num_examples) * factor
