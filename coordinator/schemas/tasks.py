"""Tasks: model, aggregation, compression and training configuration, and the task record.

Every config object forbids unknown fields and non-finite numbers, so a typo is a 422 with
the field's name instead of a silently ignored setting.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from fedge.coordinator.engine.config import AggregationConfig as AggregationConfig
from fedge.coordinator.engine.config import TargetMetric as TargetMetric
from fedge.coordinator.engine.staleness import StalenessConfig as StalenessConfig
from fedge.coordinator.schemas.common import JsonObject, Name, Page, Strict, Text
from fedge.coordinator.schemas.targeting import TaskRequirements
from fedge.coordinator.states import TaskStatus
from fedge.shared import architectures
from fedge.shared.limits import MAX_CHUNK
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import (
    MAX_WARMUP_ROUNDS,
    CompressionPolicy,
    DownloadPolicy,
    PolicyError,
)

BUILTIN_TRAINERS = ("softmax", "mlp")
#: A trainer named by entry point: ``package.module:function``.
ENTRY_POINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
MAX_SEED = 2**63 - 1

# ------------------------------------------------------------------------------ model


class BuiltinModel(Strict):
    """A built-in architecture; the coordinator builds its spec and seeded initial weights."""

    architecture: Literal["softmax", "mlp"]
    input_dim: int = Field(ge=1, le=10_000_000)
    num_classes: int = Field(ge=2, le=1_000_000)
    hidden: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=list, max_length=architectures.MAX_HIDDEN_LAYERS
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    init: Literal["he_glorot", "he_normal"] = Field(
        default="he_glorot",
        description="Initial weights: He-normal for the ReLU layers and Glorot-uniform for "
        "the output layer (he_glorot), or He-normal for every layer (he_normal)",
    )

    @model_validator(mode="after")
    def _layers(self) -> BuiltinModel:
        architectures.layers(self.model_dump())  # ValueError names the problem
        return self


class TensorEntry(Strict):
    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=8)


class SpecModel(Strict):
    """Explicit tensors; initial weights are uploaded with ``PUT /tasks/{id}/model``."""

    spec: list[TensorEntry] = Field(min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _spec(self) -> SpecModel:
        ModelSpec.from_dict([t.model_dump() for t in self.spec])
        return self


def _model_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "spec" if "spec" in value else "builtin"
    return "spec" if isinstance(value, SpecModel) else "builtin"


ModelConfig = Annotated[
    Annotated[BuiltinModel, Tag("builtin")] | Annotated[SpecModel, Tag("spec")],
    Discriminator(_model_kind),
]


def model_spec(model: BuiltinModel | SpecModel) -> ModelSpec:
    return architectures.build_spec(model.model_dump())


# ------------------------------------------------------------------------ aggregation

# AggregationConfig, StalenessConfig and TargetMetric are the round engine's own models
# (fedge.coordinator.engine.config): the API validates a task body with what the engine parses
# the stored task with, so the two cannot drift apart.

# ------------------------------------------------------------------------ compression

_DEFAULT_POLICY = CompressionPolicy()
_DEFAULT_DOWNLOAD = DownloadPolicy()


class DownloadConfig(Strict):
    """How the coordinator compresses the models devices download (see
    fedge.shared.policy.DownloadPolicy); dense by default."""

    topk_fraction: float = Field(default=_DEFAULT_DOWNLOAD.topk_fraction, gt=0, le=1)
    bits: Literal[1, 2, 4, 8, 32] = _DEFAULT_DOWNLOAD.bits  # type: ignore[assignment]
    chunk: int = Field(default=_DEFAULT_DOWNLOAD.chunk, ge=1, le=MAX_CHUNK)
    scope: Literal["tensor", "global"] = _DEFAULT_DOWNLOAD.scope


class CompressionConfig(Strict):
    """The compression policy devices must apply (see fedge.shared.policy.CompressionPolicy)."""

    topk_fraction: float = Field(default=_DEFAULT_POLICY.topk_fraction, gt=0, le=1)
    bits: Literal[1, 2, 4, 8, 32] = _DEFAULT_POLICY.bits  # type: ignore[assignment]
    chunk: int = Field(default=_DEFAULT_POLICY.chunk, ge=1, le=MAX_CHUNK)
    error_feedback: bool = _DEFAULT_POLICY.error_feedback
    scope: Literal["tensor", "global"] = _DEFAULT_POLICY.scope
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    momentum: float = Field(default=_DEFAULT_POLICY.momentum, ge=0, lt=1, strict=True)
    warmup_rounds: int = Field(
        default=_DEFAULT_POLICY.warmup_rounds, ge=0, le=MAX_WARMUP_ROUNDS, strict=True
    )
    residual_decay: float = Field(default=_DEFAULT_POLICY.residual_decay, gt=0, le=1, strict=True)

    @model_validator(mode="after")
    def _policy(self) -> CompressionConfig:
        try:
            CompressionPolicy.from_dict(self.model_dump())
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        return self

    def policy(self) -> CompressionPolicy:
        return CompressionPolicy.from_dict(self.model_dump())


# --------------------------------------------------------------------------- training


class LocalDpConfig(Strict):
    """What a device applies under local differential privacy (docs/privacy.md): clip the
    delta to L2 norm ``clip_norm``, add N(0, (noise_multiplier * clip_norm)**2) per value."""

    clip_norm: float = Field(gt=0, le=1e6)
    noise_multiplier: float = Field(gt=0, le=1e4)


class TrainingConfig(Strict):
    """Handed to devices. ``trainer`` is ``softmax``, ``mlp`` or ``package.module:function``;
    when omitted it is the model's built-in architecture."""

    trainer: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=f"^(softmax|mlp)$|{ENTRY_POINT_PATTERN}"
    )
    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    lr: float = Field(default=0.1, gt=0, le=1000)
    proximal_mu: float = Field(default=0.0, ge=0, le=1_000_000)
    extra: JsonObject = Field(default_factory=dict)
    local_dp: LocalDpConfig | None = Field(
        default=None,
        description="Local differential privacy the device applies to its delta before "
        "compressing it; set by the coordinator from aggregation.privacy (mode 'local'), "
        "a value given here is replaced",
    )


class TrainingPublic(TrainingConfig):
    trainer: str  # always resolved in stored tasks


def with_local_dp(training: TrainingConfig, aggregation: AggregationConfig) -> TrainingConfig:
    """``training`` with ``local_dp`` derived from ``aggregation.privacy`` (None unless its
    mode is 'local'): the path by which devices learn the settings."""
    p = aggregation.privacy
    local = None
    if p is not None and p.mode == "local":
        local = LocalDpConfig(clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier)
    return training.model_copy(update={"local_dp": local})


def resolve_trainer(model: BuiltinModel | SpecModel, training: TrainingConfig) -> TrainingConfig:
    """``training`` with its trainer filled in and checked against the model (ValueError)."""
    trainer = training.trainer
    if isinstance(model, BuiltinModel):
        if trainer is None:
            trainer = model.architecture
        elif trainer in BUILTIN_TRAINERS and trainer != model.architecture:
            raise ValueError(
                f"trainer '{trainer}' cannot train a '{model.architecture}' model; "
                f"use '{model.architecture}' or a custom trainer"
            )
    elif trainer is None:
        raise ValueError("a model given by spec needs training.trainer (a custom trainer)")
    return training.model_copy(update={"trainer": trainer})


# ------------------------------------------------------------------------------ tasks


class TaskCreate(Strict):
    model_config = ConfigDict(
        **Strict.model_config,
        json_schema_extra={
            "examples": [
                {
                    "name": "digits",
                    "description": "handwritten digits, softmax regression",
                    "model": {
                        "architecture": "softmax",
                        "input_dim": 64,
                        "num_classes": 10,
                        "hidden": [],
                        "seed": 0,
                    },
                    "aggregation": {"mode": "sync", "clients_per_round": 10, "min_updates": 5},
                    "compression": {"topk_fraction": 0.1, "bits": 8},
                    "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
                }
            ]
        },
    )

    name: Name
    description: Text = ""
    model: ModelConfig
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    requirements: TaskRequirements = Field(
        default_factory=TaskRequirements,
        description="What a device must offer to be given this task's work "
        "(docs/rounds.md, 'Eligibility'); empty: any device",
    )

    @model_validator(mode="after")
    def _trainer(self) -> TaskCreate:
        self.training = with_local_dp(resolve_trainer(self.model, self.training), self.aggregation)
        return self


class TaskUpdate(Strict):
    """A change to a draft task. Omitted (or null) fields stay as they are; ``aggregation``,
    ``compression`` and ``training`` are merged key by key into the current values and the
    result is validated as a whole; a new ``model`` rebuilds the spec and initial weights.
    A running or paused task accepts only ``training`` fields lr, epochs, batch_size and
    proximal_mu, applied from its next round."""

    name: Name | None = None
    description: Text | None = None
    model: ModelConfig | None = None
    aggregation: JsonObject | None = None
    compression: JsonObject | None = None
    training: JsonObject | None = None
    requirements: TaskRequirements | None = Field(
        default=None, description="Replaces the requirements as a whole"
    )


class TensorSpecPublic(BaseModel):
    name: str
    shape: list[int]


class PrivacyPublic(BaseModel):
    """What a task's differential privacy has spent (docs/privacy.md)."""

    mode: Literal["central", "local"]
    delta: float
    epsilon: float | None = Field(
        default=None, description="central: epsilon spent so far at delta (RDP accountant)"
    )
    rounds_accounted: int | None = Field(default=None, description="central: rounds released")
    target_epsilon: float | None = None
    epsilon_per_round: float | None = Field(
        default=None, description="local: what one upload of one device reveals, at delta"
    )
    verified: bool = Field(
        default=True,
        description="false for local DP: the coordinator cannot check that devices add noise",
    )


class TaskPublic(BaseModel):
    id: int
    name: str
    description: str
    status: TaskStatus
    status_reason: str | None
    model: ModelConfig
    spec: list[TensorSpecPublic]
    num_params: int
    aggregation: AggregationConfig
    compression: CompressionConfig
    training: TrainingPublic
    requirements: TaskRequirements
    pending_training: TrainingPublic | None = Field(
        default=None,
        description="Training settings changed while the task is live; they replace "
        "`training` when its next round opens",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="Settings that can never take effect as configured (e.g. a target_metric "
        "without a server-side evaluation hook)",
    )
    current_version: int = Field(description="Latest model version; -1 before initial weights")
    has_initial_weights: bool
    privacy: PrivacyPublic | None = Field(
        default=None, description="Differential privacy spent; null without aggregation.privacy"
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TasksPublic(Page[TaskPublic]):
    pass
