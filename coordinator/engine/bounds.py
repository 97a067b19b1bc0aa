"""Per-task L2 norm bound on client updates (``aggregation.norm_bound``).

The norm of an update is the L2 norm of its decoded values: after dequantization, over the
coordinates it carries (a sparse update's missing coordinates are zero and add nothing), all
tensors together, in float64 (float32 squares of values beyond about 1e19 would overflow).

Two actions:

- ``clip`` (the default): at aggregation, an update whose norm exceeds the bound ``C`` enters
  scaled by ``C / norm``, so its norm is exactly ``C``. The weighted mean of bounded updates
  is bounded by ``C`` too (it is a convex combination), so one aggregation moves the model by
  at most ``server_lr * C`` with FedAvg, whatever the devices send.
- ``refuse``: at upload, an update whose norm exceeds ``max_norm`` is refused with 422
  ``update_norm_exceeded`` before anything is stored; the device's ``num_norm_refused``
  counter is the only thing that changes.

Optionally the bound is **adaptive** (clip only): after each aggregation it follows a quantile
of the observed norms with the geometric update of Andrew et al. (2021), "Differentially
Private Learning with Adaptive Clipping": ``C <- C * exp(-lr * (b - quantile))`` where ``b``
is the fraction of the aggregation's updates whose norm was at most ``C``. The bound starts at
``initial`` (default ``max_norm``) and never exceeds ``max_norm``, so attackers that send huge
updates cannot push it up beyond what the task owner allowed. It is stored on the task row
(``tasks.norm_bound``) in the transaction that commits the model version, so it survives
restarts and never runs ahead of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from fedge.coordinator.engine.staleness import CONFIG
from fedge.shared.wire import DecodedUpdate

NormAction = Literal["clip", "refuse"]
#: The largest bound accepted (far beyond any float32 update's norm, still far from overflow).
MAX_BOUND = 1e300
#: The adaptive bound never falls below this (a fleet sending zero updates would otherwise
#: shrink it towards float64's smallest numbers).
MIN_ADAPTIVE_BOUND = 1e-12


class AdaptiveNormBound(BaseModel):
    """``C <- C * exp(-lr * (b - quantile))`` after each aggregation (module docstring)."""

    model_config = CONFIG

    quantile: float = Field(default=0.5, gt=0, lt=1, strict=True)
    lr: float = Field(default=0.2, gt=0, le=10, strict=True)
    initial: float | None = Field(default=None, gt=0, le=MAX_BOUND, strict=True)


class NormBoundConfig(BaseModel):
    """``aggregation.norm_bound``: the largest L2 norm an update may have, and what happens to
    one above it (docs/robustness.md)."""

    model_config = CONFIG

    max_norm: float = Field(gt=0, le=MAX_BOUND, strict=True)
    action: NormAction = "clip"
    adaptive: AdaptiveNormBound | None = None

    @model_validator(mode="after")
    def _consistent(self) -> NormBoundConfig:
        if self.adaptive is not None:
            if self.action != "clip":
                raise ValueError(
                    "an adaptive bound needs action 'clip': a bound that follows a quantile of "
                    "the norms would refuse a fixed share of honest updates"
                )
            if self.adaptive.initial is not None and self.adaptive.initial > self.max_norm:
                raise ValueError(
                    f"adaptive.initial ({self.adaptive.initial}) must not exceed max_norm "
                    f"({self.max_norm})"
                )
        return self

    @property
    def initial_bound(self) -> float:
        """The bound before any aggregation adapted it."""
        if self.adaptive is not None and self.adaptive.initial is not None:
            return self.adaptive.initial
        return self.max_norm


def update_norm(update: DecodedUpdate) -> float:
    """The L2 norm of the update's carried values, in float64 (one pass per tensor)."""
    total = 0.0
    for t in update.tensors:
        if t.values.size:
            total += float(np.square(t.values, dtype=np.float64).sum())
    return math.sqrt(total)


def clip_scale(norm: float, bound: float | None) -> float:
    """The factor an update of ``norm`` enters with under ``bound`` (1.0 within it or without
    a bound)."""
    if bound is None or norm <= bound:
        return 1.0
    return bound / norm


def current_bound(config: NormBoundConfig | None, stored: float | None) -> float | None:
    """The bound the next aggregation applies: the adaptive value stored on the task when
    there is one, else the configured one (``None``: no bound)."""
    if config is None:
        return None
    if config.adaptive is not None and stored is not None and math.isfinite(stored):
        return min(max(stored, MIN_ADAPTIVE_BOUND), config.max_norm)
    return config.initial_bound


def adapt(
    config: NormBoundConfig | None, bound: float | None, norms: Sequence[float]
) -> float | None:
    """The bound after an aggregation that applied ``bound`` to updates of ``norms``
    (``None``: not adaptive, nothing to store)."""
    if config is None or config.adaptive is None or bound is None or not norms:
        return None
    below = float(np.mean(np.asarray(norms, dtype=np.float64) <= bound))
    new = bound * math.exp(-config.adaptive.lr * (below - config.adaptive.quantile))
    return min(max(new, MIN_ADAPTIVE_BOUND), config.max_norm)
