"""A task's aggregation settings: the one definition of their fields, defaults and bounds.

The task API validates a task body's ``aggregation`` with :class:`AggregationConfig`
(:mod:`fedge.coordinator.schemas.tasks` re-exports it), stores it as JSON, and the engine parses the
stored JSON again with :meth:`AggregationConfig.from_dict`, so both apply the same defaults and
bounds. A stored config that no longer parses raises :class:`ConfigError` and fails the task
with a clear reason instead of crashing the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from fedge.coordinator.engine.bounds import NormBoundConfig
from fedge.coordinator.engine.privacy import PrivacyConfig, config_problems
from fedge.coordinator.engine.robust import Robust
from fedge.coordinator.engine.staleness import CONFIG, StalenessConfig
from fedge.shared.secagg import Grid, SecAggError

Mode = Literal["sync", "async"]
Weighting = Literal["num_examples", "equal"]
Strategy = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi")
#: The largest finite float32: no decoded update value exceeds it, so as ``max_update_abs``
#: it switches the per-value bound off (the aggregate's finite check still applies).
FLOAT32_MAX = 3.4028234663852886e38
#: Defaults of the update bounds (docs/rounds.md, "Update bounds").
MAX_UPDATE_ABS = 1e6
MAX_NUM_EXAMPLES = 10_000_000
#: ``max_num_examples`` stays an integer that float64 weights represent exactly.
NUM_EXAMPLES_LIMIT = 2**53
#: The longest deadline or lease: a week.
WEEK_S = 7 * 24 * 3600.0
#: The shortest deadline or lease; the scheduler could not act on anything shorter.
MIN_PERIOD_S = 0.05
#: The server optimizer's largest momentum and beta: 1 - 1e-6, so one version moves a value
#: by at most 1e6 times the step (docs/rounds.md, "Update bounds").
MAX_MOMENTUM = 0.999999


class ConfigError(ValueError):
    """An aggregation config that cannot be used; the message names the field."""


class TargetMetric(BaseModel):
    """Stop early once a model version's metric reaches ``value``."""

    model_config = CONFIG

    name: str = Field(default="accuracy", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.]+$")
    value: float = Field(strict=True)


class SecureAggregationConfig(BaseModel):
    """Secure aggregation of a sync task (docs/secure-aggregation.md): the coordinator learns
    only the sum of the round's quantized updates on a shared random-k support."""

    model_config = CONFIG

    bound: float = Field(
        default=0.1,
        gt=0,
        le=1e6,
        strict=True,
        description="B: every value sent is clipped to [-B, B] on the device (the norm bound)",
    )
    grid_bits: int = Field(
        default=16, ge=2, le=24, strict=True, description="integer grid width of a value"
    )
    planned_dropout: float = Field(
        default=1 / 3,
        ge=0,
        lt=0.5,
        strict=True,
        description="share of the cohort the neighbour graph is planned to survive dropping",
    )


class AggregationConfig(BaseModel):
    """How rounds of one task run. Field meanings: docs/api.md, docs/rounds.md."""

    model_config = CONFIG

    mode: Mode = "sync"
    strategy: Strategy = "fedavg"
    num_rounds: int = Field(default=20, ge=1, le=1_000_000, strict=True)
    target_metric: TargetMetric | None = None
    clients_per_round: int = Field(default=10, ge=1, le=100_000, strict=True)
    over_selection: float = Field(default=0.3, ge=0, le=5, strict=True)
    min_updates: int = Field(default=1, ge=1, le=100_000, strict=True)
    round_deadline_s: float = Field(default=60.0, ge=MIN_PERIOD_S, le=WEEK_S, strict=True)
    lease_s: float = Field(default=120.0, ge=MIN_PERIOD_S, le=WEEK_S, strict=True)
    max_staleness: int = Field(default=4, ge=0, le=1_000_000, strict=True)
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)
    weighting: Weighting = "num_examples"
    server_lr: float = Field(default=1.0, gt=0, le=1000, strict=True)
    server_momentum: float = Field(
        default=0.0, ge=0, le=MAX_MOMENTUM, strict=True, description="fedavgm"
    )
    server_beta1: float = Field(
        default=0.9, ge=0, le=MAX_MOMENTUM, strict=True, description="fedadam, fedyogi"
    )
    server_beta2: float = Field(
        default=0.99, ge=0, le=MAX_MOMENTUM, strict=True, description="fedadam, fedyogi"
    )
    server_eps: float = Field(
        default=1e-3, ge=1e-12, le=1, strict=True, description="fedadam, fedyogi"
    )
    buffer_size: int = Field(default=10, ge=1, le=100_000, strict=True)
    max_concurrency: int = Field(default=20, ge=1, le=100_000, strict=True)
    eval_every: int = Field(default=1, ge=1, le=1_000_000, strict=True)
    max_update_abs: float = Field(
        default=MAX_UPDATE_ABS,
        ge=1e-12,
        le=FLOAT32_MAX,
        strict=True,
        description="uploads carrying a value of larger magnitude are refused (422)",
    )
    max_num_examples: int = Field(
        default=MAX_NUM_EXAMPLES,
        ge=1,
        le=NUM_EXAMPLES_LIMIT,
        strict=True,
        description="uploads claiming more examples are refused (422)",
    )
    norm_bound: NormBoundConfig | None = Field(
        default=None,
        description="largest L2 norm of an update and what happens above it (clip or refuse); "
        "null: no bound (docs/robustness.md)",
    )
    robust: Robust = Field(
        default="mean",
        description="how the updates of one aggregation are combined: weighted mean, "
        "coordinate-wise trimmed mean or median (docs/robustness.md)",
    )
    trim_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=0.5,
        strict=True,
        description="trimmed_mean: share of the values dropped at each end of a coordinate",
    )
    krum_byzantine: int = Field(
        default=0,
        ge=0,
        le=49_998,
        strict=True,
        description="multi_krum: f, the Byzantine updates one aggregation is assumed to hold "
        "(needs at least 2f + 3 updates: min_updates in sync mode, buffer_size in async)",
    )
    krum_select: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        strict=True,
        description="multi_krum: m, the updates averaged (lowest scores); null: n - f",
    )

    selection_seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        strict=True,
        description="sync: seeds the devices each round picks, ordering the eligible devices "
        "by name, and sums a round's updates in assignment order, so that two runs of an "
        "experiment on fresh coordinators with the same fleet get the same cohorts; null: the "
        '(task, round) seed and device id order (docs/rounds.md, "Reproducible selection")',
    )

    keep_versions: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        strict=True,
        description="model versions whose blobs are kept, newest first (version 0 and the "
        "bases of work in progress always are); 0: every version; null: the coordinator's "
        "keep_versions setting",
    )
    privacy: PrivacyConfig | None = Field(
        default=None, description="differential privacy (docs/privacy.md); null: none"
    )
    secure: SecureAggregationConfig | None = Field(
        default=None,
        description="secure aggregation (docs/secure-aggregation.md); null: plain uploads",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AggregationConfig:
        if self.min_updates > self.clients_per_round:
            raise ValueError(
                f"min_updates ({self.min_updates}) must not exceed clients_per_round "
                f"({self.clients_per_round})"
            )
        if self.robust == "multi_krum":
            self._check_krum()
        if self.secure is not None:
            problem = self._secure_problem(self.secure)
            if problem:
                raise ValueError(problem)
        if self.selection_seed is not None and self.mode != "sync":
            raise ValueError("selection_seed applies to sync rounds only (mode 'sync')")
        if self.privacy is not None:
            problem = config_problems(
                self.privacy,
                mode=self.mode,
                weighting=self.weighting,
                max_staleness=self.max_staleness,
            )
            if problem:
                raise ValueError(problem)
            if self.privacy.mode == "central" and (
                self.norm_bound is not None or self.robust != "mean"
            ):
                raise ValueError(
                    "central differential privacy clips every update to privacy.clip_norm and "
                    "averages them with a fixed denominator: it cannot be combined with "
                    "norm_bound or a robust aggregation (leave norm_bound null and robust "
                    "'mean'; docs/privacy.md)"
                )
            if self.privacy.mode == "central" and self.selection_seed is not None:
                raise ValueError(
                    "central differential privacy draws each round's sample from a secret "
                    "random source (amplification by sampling assumes it): selection_seed "
                    "must be null (docs/privacy.md)"
                )
        return self

    def _secure_problem(self, secure: SecureAggregationConfig) -> str | None:
        """Why secure aggregation cannot run with the other settings (None: it can)."""
        needs_individual = "it needs each device's update, which secure aggregation hides"
        if self.mode != "sync":
            return "secure aggregation needs mode 'sync' (a fixed cohort per round)"
        if self.weighting != "equal":
            return (
                "secure aggregation averages with equal weights: set weighting 'equal' "
                "(num_examples would need its own aggregation)"
            )
        if self.privacy is not None:
            return "secure aggregation cannot be combined with differential privacy (not built)"
        if self.norm_bound is not None:
            return f"secure aggregation cannot be combined with norm_bound: {needs_individual}"
        if self.robust != "mean":
            return f"secure aggregation cannot be combined with robust {self.robust!r}: " + (
                needs_individual
            )
        if self.min_updates < 2:
            return "secure aggregation needs min_updates >= 2 (a sum of one is no secret)"
        try:
            Grid(bound=secure.bound, bits=secure.grid_bits).check_capacity(self.num_selected)
        except SecAggError as exc:
            return f"secure aggregation: {exc.detail} (selected per round: {self.num_selected})"
        return None

    def _check_krum(self) -> None:
        """Multi-Krum needs ``n >= 2f + 3`` and ``m <= n - f`` for the smallest aggregation the
        task can make: ``min_updates`` fresh updates (sync) or ``buffer_size`` (async)."""
        f, m = self.krum_byzantine, self.krum_select
        size, name = (
            (self.min_updates, "min_updates")
            if self.mode == "sync"
            else (self.buffer_size, "buffer_size")
        )
        if size < 2 * f + 3:
            raise ValueError(
                f"multi_krum with krum_byzantine {f} needs at least {2 * f + 3} updates per "
                f"aggregation (2f + 3); {name} is {size}"
            )
        if m is not None and m > size - f:
            raise ValueError(
                f"krum_select ({m}) must not exceed {name} - krum_byzantine ({size - f})"
            )

    @property
    def central_dp(self) -> PrivacyConfig | None:
        """The privacy settings when the coordinator adds the noise (central DP-FedAvg)."""
        return self.privacy if self.privacy is not None and self.privacy.mode == "central" else None

    @property
    def dp_cohort(self) -> int:
        """Central DP: the fixed denominator of the mean update."""
        if self.privacy is not None and self.privacy.expected_cohort is not None:
            return self.privacy.expected_cohort
        return self.clients_per_round

    @property
    def num_selected(self) -> int:
        """Devices picked for a sync round: ``ceil(clients_per_round * (1 + over_selection))``."""
        # Round first so 10 * 1.3 = 13.000000000000002 does not become 14.
        return math.ceil(round(self.clients_per_round * (1.0 + self.over_selection), 9))

    @property
    def target_name(self) -> str | None:
        """The early-stop metric's name (None: no target)."""
        return None if self.target_metric is None else self.target_metric.name

    @property
    def target_value(self) -> float | None:
        return None if self.target_metric is None else self.target_metric.value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggregationConfig:
        """Parse and validate a stored config (:class:`ConfigError` names the field).

        The early-stop target is read in the stored form (``target_metric`` a name and
        ``target_value``, as ``fedge.coordinator.tasks`` writes it) or the API's object form.
        Unknown top-level keys are ignored: another coordinator version may have written them.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("aggregation must be an object")
        values = {k: v for k, v in data.items() if k in cls.model_fields}
        if isinstance(values.get("target_metric"), str):
            values["target_metric"] = {
                "name": values["target_metric"],
                "value": data.get("target_value"),
            }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe(exc, prefix="aggregation")) from None


def describe(exc: ValidationError, *, prefix: str) -> str:
    """A validation error as one line, each problem led by its field: ``aggregation.x: ...``."""
    problems = []
    for err in exc.errors():
        where = ".".join([prefix, *(str(part) for part in err["loc"])])
        problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)
