"""Staleness discounting: how much an update trained on an old model version counts.

``tau = version_being_built_on - base_version`` (0 for a fresh update). Functions:

- ``constant``: ``s(tau) = 1``;
- ``polynomial``: ``s(tau) = (1 + tau) ** -a``;
- ``hinge``: ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a * (tau - b) + 1)``.

An update's weight is ``num_examples * s(tau)`` (or ``s(tau)`` with equal weighting).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FUNCTIONS = ("constant", "polynomial", "hinge")
Function = Literal["constant", "polynomial", "hinge"]

#: Task configuration objects: unknown fields, non-finite numbers and numbers of the wrong
#: type (``true`` or ``"4"`` for a count, ``4.0`` for an integer) are errors; values are
#: immutable. The API validates a task body and the engine parses the stored JSON with the
#: same models (:mod:`fedge.coordinator.engine.config`).
CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class StalenessConfig(BaseModel):
    """``s(tau)``: constant 1, polynomial ``(1+tau)^-a``, hinge (1 if tau <= b else
    ``1/(a(tau-b)+1)``)."""

    model_config = CONFIG

    function: Function = "polynomial"
    a: float = Field(default=0.5, gt=0, le=1000, strict=True)
    b: int = Field(default=4, ge=0, le=1_000_000, strict=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StalenessConfig:
        """Parse and validate (``ValueError``, a pydantic ``ValidationError``, names the field)."""
        if not isinstance(data, Mapping):
            raise ValueError("must be an object like {'function': 'polynomial', 'a': 0.5}")
        return cls.model_validate(dict(data))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


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
