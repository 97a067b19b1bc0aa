"""Simulated device faults for fleet runs: dropouts, stragglers, offline spells.

For every assignment a device draws one :class:`FaultDecision` from its own seeded
generator:

- **dropout** (probability ``dropout``): the device vanishes mid-training. It has fetched the
  model, then never trains nor uploads that assignment; the coordinator marks it dropped.
- **straggler delay**: extra compute time, heavy-tailed (Pareto with shape
  ``straggler_shape`` times a per-device lognormal speed factor, times ``straggler_scale_s``),
  capped at ``straggler_cap_s``. The wait ends early when the round is cancelled, as real
  training would.
- **offline spell** (probability ``offline``): after computing and saving its update the
  device loses its connection for ``offline_s`` seconds and uploads afterwards, so the update
  reaches the coordinator late (stale, or refused when too stale).

The agent itself knows nothing of these: :class:`FaultHooks` turns one device's decisions into
the agent's neutral hook points (:class:`fedge.edge_agent.hooks.AgentHooks`), and the fleet passes
it to each agent it builds. A real agent runs with no hooks (the equivalent of :data:`NO_FAULTS`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedge.edge_agent.client import Work
from fedge.edge_agent.hooks import AgentHooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultConfig:
    dropout: float = 0.0
    straggler_scale_s: float = 0.0
    straggler_shape: float = 1.5
    straggler_cap_s: float = 5.0
    device_speed_sigma: float = 0.5
    offline: float = 0.0
    offline_s: tuple[float, float] = (1.0, 3.0)

    def __post_init__(self) -> None:
        for name in ("dropout", "offline"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.straggler_scale_s < 0 or self.straggler_cap_s < 0:
            raise ValueError("straggler delays must not be negative")
        if self.straggler_shape <= 0:
            raise ValueError("straggler_shape must be positive")
        low, high = self.offline_s
        if not 0 <= low <= high:
            raise ValueError("offline_s must be (low, high) with 0 <= low <= high")


@dataclass(frozen=True)
class FaultDecision:
    drop: bool = False
    delay_s: float = 0.0
    offline_s: float = 0.0


NO_FAULT = FaultDecision()


class FaultSchedule:
    """Draws the fault decision for each assignment of one device."""

    def __init__(self, config: FaultConfig, rng: np.random.Generator) -> None:
        self.config = config
        self._rng = rng
        self.speed = float(rng.lognormal(0.0, config.device_speed_sigma))
        self._decided: dict[int, FaultDecision] = {}

    def decide(self, assignment_id: int) -> FaultDecision:
        """The decision for an assignment; asking again gives the same answer."""
        if assignment_id in self._decided:
            return self._decided[assignment_id]
        cfg, rng = self.config, self._rng
        drop, offline, spell = rng.random(3)
        delay = 0.0
        if cfg.straggler_scale_s > 0:
            pareto = float(rng.pareto(cfg.straggler_shape))
            delay = min(cfg.straggler_cap_s, cfg.straggler_scale_s * self.speed * pareto)
        low, high = cfg.offline_s
        decision = FaultDecision(
            drop=bool(drop < cfg.dropout),
            delay_s=delay,
            offline_s=float(low + (high - low) * spell) if offline < cfg.offline else 0.0,
        )
        self._decided[assignment_id] = decision
        return decision


class NoFaults:
    """The schedule of a real device: nothing simulated."""

    def decide(self, assignment_id: int) -> FaultDecision:
        return NO_FAULT


NO_FAULTS = NoFaults()


class FaultSource(Protocol):
    """Anything that decides a device's faults per assignment (the same answer when asked
    again): :class:`FaultSchedule`, :data:`NO_FAULTS`, or a benchmark's own schedule."""

    def decide(self, assignment_id: int) -> FaultDecision: ...


class FaultHooks(AgentHooks):
    """Injects one device's simulated faults into its agent, from outside the agent.

    - dropout: declines the assignment once its model is fetched (the agent walks away);
    - straggler delay: waits before training, ended early by cancellation or stop;
    - offline spell: holds the first upload back, ended early by stop.

    With ``seed_by_version`` the device's training is seeded by (task, base version) instead
    of the assignment id: in sync mode a device trains at most once per version, and two runs
    of an experiment (fresh coordinators, the same cohorts: ``selection_seed``) then train
    alike although their assignment ids differ.
    """

    def __init__(self, faults: FaultSource, *, seed_by_version: bool = False) -> None:
        self.faults = faults
        self.seed_by_version = seed_by_version

    def training_entropy(self, work: Work) -> tuple[int, ...]:
        if self.seed_by_version:
            return (work.task_id, work.base_version)
        return super().training_entropy(work)

    def keep_assignment(self, work: Work) -> bool:
        if self.faults.decide(work.assignment_id).drop:
            log.info("simulated dropout: vanishing during assignment %d", work.assignment_id)
            return False
        return True

    def before_training(self, work: Work, interrupted: threading.Event) -> None:
        delay = self.faults.decide(work.assignment_id).delay_s
        if delay > 0:
            if delay >= 0.05:
                log.info("simulated straggler: %.1f s of extra compute", delay)
            interrupted.wait(delay)

    def before_first_upload(self, work: Work, stop: threading.Event) -> bool:
        offline = self.faults.decide(work.assignment_id).offline_s
        if offline <= 0:
            return False
        log.info("simulated offline spell of %.1f s before uploading", offline)
        stop.wait(offline)
        return True
