"""Task service: creation, draft edits, initial weights and lifecycle transitions.

Service functions flush, never commit (the request's session commits). Blobs are written
before the rows that name them, so a committed row never points at a missing blob; a failed
transaction can at worst leave an unreferenced blob behind.

Storage format of ``Task.aggregation``: the API's :class:`AggregationConfig` with every default
filled in, except that the API's ``target_metric: {"name", "value"}`` is stored flat as
``target_metric`` (name) and ``target_value``, the form the round engine reads
(:mod:`fedge.coordinator.engine.config`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.db import utcnow
from fedge.coordinator.engine import privacy
from fedge.coordinator.errors import ApiError, BadRequest, Conflict, Unprocessable
from fedge.coordinator.events import emit
from fedge.coordinator.models import ModelVersion, Task
from fedge.coordinator.schemas.model_versions import ModelVersionPublic
from fedge.coordinator.schemas.targeting import TaskRequirements
from fedge.coordinator.schemas.tasks import (
    AggregationConfig,
    BuiltinModel,
    CompressionConfig,
    PrivacyPublic,
    SpecModel,
    TaskCreate,
    TaskPublic,
    TaskUpdate,
    TensorSpecPublic,
    TrainingConfig,
    TrainingPublic,
    model_spec,
    resolve_trainer,
    with_local_dp,
)
from fedge.coordinator.settings import Settings
from fedge.coordinator.states import TASK_LIVE, TaskStatus
from fedge.shared import architectures, wire
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy

#: Lifecycle actions: action -> (statuses it applies to, status it leads to).
TRANSITIONS: dict[str, tuple[tuple[TaskStatus, ...], TaskStatus]] = {
    "start": ((TaskStatus.DRAFT,), TaskStatus.RUNNING),
    "pause": ((TaskStatus.RUNNING,), TaskStatus.PAUSED),
    "resume": ((TaskStatus.PAUSED,), TaskStatus.RUNNING),
    "cancel": ((TaskStatus.DRAFT, TaskStatus.RUNNING, TaskStatus.PAUSED), TaskStatus.CANCELLED),
}
#: Training settings a running or paused task accepts (applied from its next round).
LIVE_TRAINING_FIELDS = ("lr", "epochs", "batch_size", "proximal_mu")
#: Wire codes that mean "valid encoding, wrong content" (422); the others are 400.
UNPROCESSABLE_WIRE_CODES = frozenset({"shape_mismatch", "policy_mismatch"})

ModelConfig = BuiltinModel | SpecModel
M = TypeVar("M", bound=BaseModel)


# ------------------------------------------------------------------------ conversions


def aggregation_to_stored(cfg: AggregationConfig) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    target = data.pop("target_metric")
    data["target_metric"] = None if target is None else target["name"]
    data["target_value"] = None if target is None else target["value"]
    return data


def aggregation_from_stored(data: Mapping[str, Any]) -> AggregationConfig:
    values = dict(data)
    name, value = values.pop("target_metric", None), values.pop("target_value", None)
    values["target_metric"] = None if name is None else {"name": name, "value": value}
    return AggregationConfig.model_validate(values)


def parse_model(data: Mapping[str, Any]) -> ModelConfig:
    if "spec" in data:
        return SpecModel.model_validate(data)
    return BuiltinModel.model_validate(data)


def config_warnings(task: Task, settings: Settings | None) -> list[str]:
    """Settings of ``task`` that can never take effect as configured (docs/api.md, "Task
    warnings"): returned with the task and, while it runs, given as its ``status_reason``.

    Static checks only (a quorum larger than the round is refused outright by
    :class:`AggregationConfig`)."""
    try:
        cfg = aggregation_from_stored(task.aggregation)
    except ValueError:
        return []
    found: list[str] = []
    target, value = cfg.target_name, cfg.target_value
    if target is not None and value is not None:
        where = f"aggregation.target_metric {target!r}"
        if settings is not None and not settings.eval_hook:
            found.append(
                f"{where} can never be reached: it is compared with the server-side "
                "evaluation, and no evaluation hook is configured (set FEDGE_EVAL_HOOK, see "
                "docs/configuration.md); the task runs all its num_rounds"
            )
        if "accuracy" in target and not 0.0 <= value <= 1.0:
            found.append(
                f"{where} has value {value:g}, but accuracy is a fraction in [0, 1]; the "
                "target can never be reached"
            )
    return found


def _privacy_public(aggregation: AggregationConfig, task: Task) -> PrivacyPublic | None:
    spent = privacy.report(aggregation.privacy, task.privacy)
    return None if spent is None else PrivacyPublic.model_validate(spent)


def to_public(task: Task, settings: Settings | None = None) -> TaskPublic:
    spec = ModelSpec.from_dict(task.model_spec)
    pending = task.pending_training
    aggregation = aggregation_from_stored(task.aggregation)
    return TaskPublic(
        id=task.id,
        name=task.name,
        description=task.description,
        status=task.status,
        status_reason=task.status_reason,
        model=parse_model(task.model_config_),
        spec=[TensorSpecPublic(name=t.name, shape=list(t.shape)) for t in spec.tensors],
        num_params=spec.num_params,
        aggregation=aggregation,
        compression=CompressionConfig.model_validate(task.compression),
        training=TrainingPublic.model_validate(task.training),
        requirements=TaskRequirements.model_validate(task.requirements or {}),
        pending_training=(
            None if pending is None else TrainingPublic.model_validate({**task.training, **pending})
        ),
        warnings=config_warnings(task, settings),
        current_version=task.current_version,
        has_initial_weights=task.current_version >= 0,
        privacy=_privacy_public(aggregation, task),
        created_at=task.created_at,
        updated_at=task.updated_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
    )


def version_to_public(row: ModelVersion) -> ModelVersionPublic:
    return ModelVersionPublic(
        task_id=row.task_id,
        version=row.version,
        digest=row.blob_digest,
        size_bytes=row.size_bytes,
        round_id=row.round_id,
        num_updates=row.num_updates,
        metrics=row.metrics or {},
        created_at=row.created_at,
        pruned_at=row.pruned_at,
    )


def _validation_detail(exc: ValidationError, *, prefix: str) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in (prefix, *err.get("loc", ())))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _validate(model: type[M], data: Any, *, prefix: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Unprocessable(_validation_detail(exc, prefix=prefix)) from None


# ------------------------------------------------------------------------------ model


def model_limits(settings: Settings) -> Limits:
    """Decoder limits for a model of at most ``max_model_bytes`` of float32 values."""
    max_params = max(1, settings.max_model_bytes // 4)
    return Limits(
        max_tensor_elements=min(DEFAULT_LIMITS.max_tensor_elements, max_params),
        max_total_elements=min(DEFAULT_LIMITS.max_total_elements, max_params),
    )


def _checked_spec(model: ModelConfig, settings: Settings) -> ModelSpec:
    try:
        spec = model_spec(model)
    except ValueError as exc:
        raise Unprocessable(f"model: {exc}") from None
    max_params = settings.max_model_bytes // 4
    if spec.num_params > max_params:
        raise Unprocessable(
            f"model: {spec.num_params} parameters; this coordinator allows at most "
            f"{max_params} (max_model_bytes / 4)"
        )
    return spec


def _store_version_zero(session: Session, blobs: BlobStore, task: Task, data: bytes) -> None:
    """Make ``data`` (an encoded model) the task's version 0, replacing any earlier one."""
    digest = blobs.put(data)
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == 0)
    )
    if row is None:
        row = ModelVersion(task_id=task.id, version=0, num_updates=0, metrics={})
        session.add(row)
    row.blob_digest = digest
    row.size_bytes = len(data)
    row.created_at = utcnow()
    task.current_version = 0


def _broadcast_version_zero(
    session: Session, blobs: BlobStore, task: Task, *, generated: bool | None = None
) -> None:
    """The broadcast model devices start from (fedge.shared.broadcast): with compressed
    downloads, version 0 rounded to float16, sent at half the bytes of the float32 model; the
    rounding error is part of ``w - b`` and goes down with the first deltas (server-side error
    feedback). Dense downloads, weights beyond float16's range, and a built-in model's seeded
    initial weights (which devices generate instead of downloading) broadcast the model
    itself. ``generated``: whether version 0 is those seeded weights, when the caller just
    stored them (else it is found out by generating them again)."""
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == 0)
    )
    if row is None:
        return
    row.broadcast_digest = row.broadcast_size = None
    if CompressionPolicy.from_dict(task.compression).download.is_dense:
        return
    if generated if generated is not None else _generated(task, row):
        return
    try:
        data = wire.encode_model(wire.decode_model(blobs.get(row.blob_digest)), dtype="f16")
    except ValueError:  # a value beyond float16's range: devices get the float32 model
        return
    row.broadcast_digest = blobs.put(data)
    row.broadcast_size = len(data)


def _drop_version_zero(session: Session, task: Task) -> None:
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == 0)
    )
    if row is not None:
        session.delete(row)
    task.current_version = -1


def _initial_weights(model: BuiltinModel) -> bytes:
    weights = architectures.generated_weights(model.model_dump())
    assert weights is not None
    return wire.encode_model(weights)


def _generated(task: Task, row: ModelVersion) -> bool:
    """True when version 0 is the built-in model's seeded initial weights, which devices
    generate themselves (they confirm them with the ETag, and download nothing)."""
    model = parse_model(task.model_config_)
    if not isinstance(model, BuiltinModel):
        return False
    return row.blob_digest == hashlib.sha256(_initial_weights(model)).hexdigest()


# ------------------------------------------------------------------------------ tasks


def create_task(session: Session, blobs: BlobStore, settings: Settings, body: TaskCreate) -> Task:
    """A new draft task; built-in models get seeded initial weights as version 0."""
    spec = _checked_spec(body.model, settings)
    now = utcnow()
    task = Task(
        name=body.name,
        description=body.description,
        status=TaskStatus.DRAFT,
        model_config_=body.model.model_dump(mode="json"),
        model_spec=spec.to_dict(),
        aggregation=aggregation_to_stored(body.aggregation),
        compression=body.compression.model_dump(mode="json"),
        training=body.training.model_dump(mode="json"),
        requirements=body.requirements.model_dump(mode="json", exclude_defaults=True),
        current_version=-1,
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    session.flush()
    if isinstance(body.model, BuiltinModel):
        _store_version_zero(session, blobs, task, _initial_weights(body.model))
        session.flush()
        _broadcast_version_zero(session, blobs, task, generated=True)
        session.flush()
    return task


def require_draft(task: Task) -> None:
    if task.status != TaskStatus.DRAFT:
        raise Conflict(
            f"task {task.id} is {task.status}; only draft tasks can be changed",
            code="task_not_draft",
        )


def update_task(
    session: Session, blobs: BlobStore, settings: Settings, task: Task, patch: TaskUpdate
) -> Task:
    """Apply a draft edit (see :class:`TaskUpdate`). A running or paused task accepts only
    ``training`` settings of :data:`LIVE_TRAINING_FIELDS`, which wait in ``pending_training``
    until its next round opens; anything else is 409 ``task_not_draft``."""
    if task.status in TASK_LIVE:
        return _update_live_training(task, patch)
    require_draft(task)
    old_model = parse_model(task.model_config_)
    model = patch.model if patch.model is not None else old_model
    aggregation = aggregation_from_stored(task.aggregation)
    if patch.aggregation is not None:
        merged = {**aggregation.model_dump(), **patch.aggregation}
        aggregation = _validate(AggregationConfig, merged, prefix="aggregation")
    compression = CompressionConfig.model_validate(task.compression)
    if patch.compression is not None:
        merged = {**compression.model_dump(), **patch.compression}
        compression = _validate(CompressionConfig, merged, prefix="compression")
    training_data = {**task.training, **(patch.training or {})}
    # A trainer that was only the old architecture's default follows the new model.
    if (
        patch.model is not None
        and isinstance(old_model, BuiltinModel)
        and task.training.get("trainer") == old_model.architecture
        and "trainer" not in (patch.training or {})
    ):
        training_data["trainer"] = None
    training = _validate(TrainingConfig, training_data, prefix="training")
    try:
        training = with_local_dp(resolve_trainer(model, training), aggregation)
    except ValueError as exc:
        raise Unprocessable(f"training: {exc}") from None

    generated: bool | None = None  # unknown unless version 0 is stored anew below
    if patch.model is not None:
        spec = _checked_spec(model, settings)
        same_spec = spec.to_dict() == task.model_spec
        if isinstance(model, BuiltinModel):
            _store_version_zero(session, blobs, task, _initial_weights(model))
            generated = True
        elif not same_spec:
            _drop_version_zero(session, task)
        task.model_config_ = model.model_dump(mode="json")
        task.model_spec = spec.to_dict()
    if patch.name is not None:
        task.name = patch.name
    if patch.description is not None:
        task.description = patch.description
    task.aggregation = aggregation_to_stored(aggregation)
    task.compression = compression.model_dump(mode="json")
    task.training = training.model_dump(mode="json")
    if patch.requirements is not None:
        task.requirements = patch.requirements.model_dump(mode="json", exclude_defaults=True)
    session.flush()
    _broadcast_version_zero(session, blobs, task, generated=generated)
    task.updated_at = utcnow()
    session.flush()
    return task


def _update_live_training(task: Task, patch: TaskUpdate) -> Task:
    changed = set(patch.model_dump(exclude_none=True))
    fields = set(patch.training or {})
    refused = sorted(changed - {"training"}) + sorted(
        f"training.{f}" for f in fields - set(LIVE_TRAINING_FIELDS)
    )
    if refused or not fields:
        raise Conflict(
            f"task {task.id} is {task.status}: only training settings "
            f"({', '.join(LIVE_TRAINING_FIELDS)}) can change now"
            + (f", not {', '.join(refused)}" if refused else "")
            + "; other settings need a draft task",
            code="task_not_draft",
        )
    merged = {**task.training, **(task.pending_training or {}), **(patch.training or {})}
    training = _validate(TrainingConfig, merged, prefix="training").model_dump(mode="json")
    pending = {k: training[k] for k in LIVE_TRAINING_FIELDS if training[k] != task.training[k]}
    task.pending_training = pending or None
    task.updated_at = utcnow()
    return task


def upload_initial_model(
    session: Session, blobs: BlobStore, settings: Settings, task: Task, data: bytes
) -> ModelVersion:
    """Decode an uploaded model against the task's spec and store it as version 0."""
    require_draft(task)
    spec = ModelSpec.from_dict(task.model_spec)
    try:
        weights = wire.decode_model(data, spec=spec, limits=model_limits(settings))
    except wire.WireFormatError as exc:
        cls: type[ApiError] = Unprocessable if exc.code in UNPROCESSABLE_WIRE_CODES else BadRequest
        raise cls(exc.detail, code=exc.code) from None
    # Stored canonically as float32, whatever precision was uploaded.
    _store_version_zero(session, blobs, task, wire.encode_model(weights))
    session.flush()
    _broadcast_version_zero(session, blobs, task)
    task.updated_at = utcnow()
    session.flush()
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.task_id == task.id, ModelVersion.version == 0)
    )
    assert row is not None
    return row


def transition(
    session: Session, task: Task, action: str, *, warnings: list[str] | None = None
) -> Task:
    """Apply a lifecycle action; 409 ``invalid_transition`` when it does not apply.

    Pausing or cancelling only changes the status here: the round engine then cancels the
    task's active assignments (waking their devices) and, for a cancelled task, fails its
    open round and rejects updates not yet aggregated.
    """
    sources, target = TRANSITIONS[action]
    if task.status not in sources:
        allowed = " or ".join(sources)
        raise Conflict(
            f"cannot {action} task {task.id}: it is {task.status} (needs {allowed})",
            code="invalid_transition",
        )
    if action == "start" and task.current_version < 0:
        raise Conflict(
            f"cannot start task {task.id}: it has no initial weights; upload them with "
            f"PUT /api/v1/tasks/{task.id}/model",
            code="invalid_transition",
        )
    now = utcnow()
    reason = None
    if target == TaskStatus.RUNNING and warnings:
        reason = "warning: " + "; ".join(warnings)
    values: dict[str, Any] = {"status": target, "status_reason": reason, "updated_at": now}
    if action == "start":
        values["started_at"] = now
    if target == TaskStatus.CANCELLED:
        values["finished_at"] = now
    # Compare-and-set on the status read above: the round engine may have completed or
    # failed the task since (it holds the task row lock while it does), and an action must
    # not overwrite that newer state.
    session.flush()
    moved = session.execute(
        update(Task)
        .where(Task.id == task.id, Task.status == task.status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(task)
    if not moved.rowcount:  # type: ignore[attr-defined]
        raise Conflict(
            f"cannot {action} task {task.id}: it became {task.status} meanwhile",
            code="invalid_transition",
        )
    emit(session, f"task.{target}", task=task.id, action=action)
    return task
