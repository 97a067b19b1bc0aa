"""Differential privacy of a task (``aggregation.privacy``; docs/privacy.md).

Two modes:

- ``central`` -- DP-FedAvg (McMahan et al. 2018). The coordinator clips every decoded update
  to L2 norm ``clip_norm``, sums the clipped updates, divides by the fixed ``expected_cohort``
  (not by the number or weight of the updates that arrived) and adds Gaussian noise of std
  ``noise_multiplier * clip_norm / expected_cohort`` to **every coordinate** of the mean.
  One round is then a sampled Gaussian mechanism with noise multiplier ``noise_multiplier``
  on the sum; the task's privacy ledger composes them with Google's ``dp-accounting`` (RDP
  accountant, Poisson-sampled Gaussian events with ``q`` = devices picked / devices eligible).
- ``local`` -- every device clips its own delta and adds Gaussian noise of std
  ``noise_multiplier * clip_norm`` before compressing it (``fedge.edge_agent.local_dp``); the
  coordinator only hands the settings out (``training.local_dp``) and cannot check them.

The ledger is JSON on the task row (``Task.privacy``): the sampling rate of the open round,
noted when it opens, and the released rounds grouped by (sampling rate, noise multiplier),
written in the transaction that commits the model version they pay for, so it survives
restarts and never falls behind the released models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from fedge.coordinator.engine.staleness import CONFIG
from fedge.shared.dp import add_gaussian_noise, clip_factor, l2_norm
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wire import DecodedUpdate

PrivacyMode = Literal["central", "local"]

#: The Renyi orders the accountant evaluates: whole numbers only (dp-accounting's fractional
#: orders below 2 make its series fail to converge for small noise and log a warning per order),
#: dense where the optimum usually lies, sparse towards the large orders that small epsilons need.
ORDERS: tuple[float, ...] = (*range(2, 65), 80, 96, 128, 192, 256, 512, 1024)
#: Sampling rates enter the ledger rounded **up** to this many significant digits, so a fleet
#: whose size drifts adds a handful of distinct events instead of one per round (at most a 1%
#: overstatement of q).
Q_DIGITS = 3


class PrivacyConfig(BaseModel):
    """``aggregation.privacy``: field meanings in docs/privacy.md."""

    model_config = CONFIG

    mode: PrivacyMode = "central"
    clip_norm: float = Field(gt=0, le=1e6, strict=True)
    noise_multiplier: float = Field(gt=0, le=1e4, strict=True)
    expected_cohort: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        strict=True,
        description="central: the fixed denominator of the mean (default clients_per_round)",
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, strict=True)
    target_epsilon: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        strict=True,
        description="central: the task finishes before a round that would spend more",
    )


def config_problems(
    privacy: PrivacyConfig, *, mode: str, weighting: str, max_staleness: int
) -> str:
    """Why a task's aggregation settings cannot be accounted with ``privacy`` ('' when they
    can). Central DP needs every aggregated update to come from the round's own uniform sample
    and to enter with the same weight."""
    if privacy.mode == "local":
        if privacy.target_epsilon is not None:
            return "privacy.target_epsilon needs mode 'central' (local noise is not accounted)"
        return ""
    problems = []
    if mode != "sync":
        problems.append("central differential privacy needs mode 'sync' (async has no sample)")
    if weighting != "equal":
        problems.append(
            "central differential privacy needs weighting 'equal': each clipped update enters "
            "with weight 1 and the mean has the fixed denominator expected_cohort"
        )
    if max_staleness != 0:
        problems.append(
            "central differential privacy needs max_staleness 0: a late update belongs to an "
            "earlier round's sample"
        )
    return "; ".join(problems)


# ------------------------------------------------------------------------------ aggregation


def private_sum(
    updates: Iterable[DecodedUpdate], spec: ModelSpec, *, clip_norm: float
) -> tuple[dict[str, np.ndarray], int]:
    """``sum_i clip(delta_i)`` in float64 and the number of updates; each update is scaled by
    ``min(1, clip_norm / ||delta_i||_2)`` (the norm over the values it carries: the zeros it
    leaves out add nothing) and added in O(nnz)."""
    sums = {t.name: np.zeros(t.shape, np.float64) for t in spec.tensors}
    count = 0
    for update in updates:
        factor = clip_factor(l2_norm(t.values for t in update.tensors), clip_norm)
        update.add_to(sums, factor)
        count += 1
    return sums, count


def noise_std(privacy: PrivacyConfig, cohort: int) -> float:
    """The std of the Gaussian noise added to each coordinate of the mean update."""
    return privacy.noise_multiplier * privacy.clip_norm / cohort


def privatize_mean(
    sums: Mapping[str, np.ndarray],
    *,
    privacy: PrivacyConfig,
    cohort: int,
    rng: np.random.Generator,
) -> Mapping[str, np.ndarray]:
    """``sums / cohort + N(0, noise_std**2)`` on every coordinate, in place."""
    for acc in sums.values():
        acc /= cohort
    add_gaussian_noise(sums, noise_std(privacy, cohort), rng)
    return sums


# ------------------------------------------------------------------------------ accounting


def rounded_rate(num_picked: int, num_eligible: int) -> float:
    """The sampling rate ``num_picked / num_eligible`` (at most 1), rounded up to
    :data:`Q_DIGITS` significant digits."""
    if num_eligible <= 0:
        return 1.0
    q = min(1.0, num_picked / num_eligible)
    if q <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(q)) - Q_DIGITS + 1)
    return min(1.0, math.ceil(round(q / scale, 9)) * scale)


@dataclass
class Ledger:
    """The rounds a task has released under central DP: ``(q, noise_multiplier) -> count``."""

    events: dict[tuple[float, float], int] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return sum(self.events.values())

    def add(self, q: float, noise_multiplier: float, count: int = 1) -> Ledger:
        """A new ledger with ``count`` more rounds (this one is left unchanged)."""
        events = dict(self.events)
        key = (float(q), float(noise_multiplier))
        events[key] = events.get(key, 0) + count
        return Ledger(events)

    def epsilon(self, delta: float) -> float:
        """The epsilon spent at ``delta`` (0.0 for no rounds)."""
        if not self.events:
            return 0.0
        # Imported here: the edge agent never needs it, and it costs ~1 s to import.
        import dp_accounting
        from dp_accounting import rdp

        logging.getLogger("absl").setLevel(logging.ERROR)
        accountant = rdp.RdpAccountant(list(ORDERS))
        for (q, z), count in sorted(self.events.items()):
            gaussian = dp_accounting.GaussianDpEvent(z)
            accountant.compose(dp_accounting.PoissonSampledDpEvent(q, gaussian), count)
        return float(accountant.get_epsilon(delta))

    def to_json(self, *, delta: float) -> dict[str, Any]:
        return {
            "events": [[q, z, n] for (q, z), n in sorted(self.events.items())],
            "rounds_accounted": self.rounds,
            "delta": delta,
            "epsilon": self.epsilon(delta),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Ledger:
        if not data:
            return cls()
        events: dict[tuple[float, float], int] = {}
        for q, z, n in data.get("events", []):
            key = (float(q), float(z))
            events[key] = events.get(key, 0) + int(n)
        return cls(events)


def with_open_round(stored: Mapping[str, Any] | None, *, round_id: int, q: float) -> dict[str, Any]:
    """The task's privacy JSON noting the sampling rate of the round just opened (what its
    aggregation will be charged)."""
    out = dict(stored or {})
    out["open_round"] = {"round_id": round_id, "sampling_rate": q}
    return out


def charge(
    stored: Mapping[str, Any] | None, *, round_id: int, noise_multiplier: float, delta: float
) -> dict[str, Any]:
    """The task's privacy JSON after round ``round_id`` released a version: one more event at
    the sampling rate noted when the round opened (1.0, the most, if none was noted)."""
    noted = (stored or {}).get("open_round") or {}
    q = float(noted["sampling_rate"]) if noted.get("round_id") == round_id else 1.0
    return Ledger.from_json(stored).add(q, noise_multiplier).to_json(delta=delta)


def local_epsilon_per_round(privacy: PrivacyConfig) -> float:
    """Local mode: what one device's upload reveals about its data set, at ``privacy.delta``.

    The noise std is ``noise_multiplier * clip_norm`` and replacing the whole data set moves a
    clipped update by up to ``2 * clip_norm``: a Gaussian mechanism with noise multiplier
    ``noise_multiplier / 2`` on a sensitivity-1 query."""
    import dp_accounting
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.GaussianDpEvent(privacy.noise_multiplier / 2.0))
    return float(accountant.get_epsilon(privacy.delta))


def report(
    privacy: PrivacyConfig | None, stored: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The task view's ``privacy`` object (None for a task without DP)."""
    if privacy is None:
        return None
    if privacy.mode == "local":
        return {
            "mode": "local",
            "epsilon_per_round": local_epsilon_per_round(privacy),
            "delta": privacy.delta,
            "verified": False,
        }
    stored = stored or {}
    return {
        "mode": "central",
        "epsilon": float(stored.get("epsilon", 0.0)),
        "delta": privacy.delta,
        "rounds_accounted": int(stored.get("rounds_accounted", 0)),
        "target_epsilon": privacy.target_epsilon,
    }


def budget_refusal(
    privacy: PrivacyConfig, stored: Mapping[str, Any] | None, *, q: float
) -> str | None:
    """The reason to finish the task instead of opening a round of sampling rate ``q``, when
    that round would take the task past ``target_epsilon`` (None: go ahead)."""
    if privacy.mode != "central" or privacy.target_epsilon is None:
        return None
    ledger = Ledger.from_json(stored)
    after = ledger.add(q, privacy.noise_multiplier).epsilon(privacy.delta)
    if after <= privacy.target_epsilon:
        return None
    spent = float((stored or {}).get("epsilon", 0.0))
    return (
        f"privacy budget: epsilon {spent:.4g} spent after {ledger.rounds} round(s); the next "
        f"round (sampling rate {q:.4g}) would reach {after:.4g} > target_epsilon "
        f"{privacy.target_epsilon:g} at delta {privacy.delta:g}"
    )
