"""SQLAlchemy 2.0 ORM models: the coordinator's whole durable state (see DESIGN.md).

Status columns hold the string values of the enums in :mod:`fedge.coordinator.states` (a
``String(16)`` on every backend, so migrations stay portable between SQLite and PostgreSQL);
the ORM reads them back as enum members, refuses any other value before it is sent, and a
CHECK constraint per column (``ck_<table>_status``) refuses it in the database too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from fedge.coordinator.db import StatusType, UTCDateTime, status_check, utcnow
from fedge.coordinator.states import ASSIGNMENT_ACTIVE as ASSIGNMENT_ACTIVE  # older import path
from fedge.coordinator.states import (
    AssignmentStatus,
    DeviceStatus,
    RoundStatus,
    TaskStatus,
    UpdateStatus,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES = ("admin", "viewer")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


def _now_column() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, nullable=False)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (status_check(TaskStatus),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[TaskStatus] = mapped_column(
        StatusType(TaskStatus), default=TaskStatus.DRAFT, index=True
    )
    # {"architecture": ...} or {"spec": [...]}, as given by the administrator.
    model_config_: Mapped[dict[str, Any]] = mapped_column("model_config", JSON)
    # Ordered [{"name", "shape"}] (fedge.shared.modelspec.ModelSpec.to_dict()).
    model_spec: Mapped[list[Any]] = mapped_column(JSON)
    aggregation: Mapped[dict[str, Any]] = mapped_column(JSON)
    compression: Mapped[dict[str, Any]] = mapped_column(JSON)
    training: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Training settings changed while the task is live: moved into ``training`` when the
    # engine opens the next round (fedge.coordinator.engine.rounds.apply_pending_training).
    pending_training: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Latest model version; -1 until initial weights exist.
    current_version: Mapped[int] = mapped_column(Integer, default=-1)
    # Server optimizer state (e.g. momentum buffer) lives in a blob; digest here.
    optimizer_state_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    # The adaptive L2 norm bound after the latest aggregation (fedge.coordinator.engine.bounds);
    # null: none adapted yet, the task's configured bound applies. The columns of migration 0007
    # are nullable without defaults (a null counter is 0), so the ORM leaves them out of its
    # INSERTs: tests seed databases at earlier revisions through these models.
    norm_bound: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # What a device must offer to be given work (fedge.coordinator.engine.eligibility).
    requirements: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # Central differential privacy: the open round's sampling rate, the rounds released so far
    # and the epsilon they spent (fedge.coordinator.engine.privacy); null for a task without it.
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    rounds: Mapped[list[Round]] = relationship(back_populates="task", order_by="Round.number")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    blob_digest: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # What devices download (fedge.shared.broadcast): the broadcast model, when it differs
    # from the true model (compressed downloads), and the delta from the previous version's
    # broadcast model. NULL broadcast: the true model is broadcast; NULL delta: none exists.
    broadcast_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    broadcast_size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    delta_digest: Mapped[str | None] = mapped_column(String(64), default=None)
    delta_size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), default=None)
    num_updates: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _now_column()
    # Set when the retention policy released this version's blobs (fedge.coordinator.retention):
    # the row stays (history, the API's 410 version_pruned), its digests name nothing readable.
    pruned_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def served_digest(self) -> str:
        """The blob devices download as the full model of this version."""
        return self.broadcast_digest or self.blob_digest

    @property
    def served_size(self) -> int:
        return self.broadcast_size if self.broadcast_size is not None else self.size_bytes


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("task_id", "number"), status_check(RoundStatus))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    base_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[RoundStatus] = mapped_column(
        StatusType(RoundStatus), default=RoundStatus.OPEN, index=True
    )
    target_updates: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime] = _now_column()
    deadline_at: Mapped[datetime | None] = mapped_column(default=None)
    closed_at: Mapped[datetime | None] = mapped_column(default=None)
    result_version: Mapped[int | None] = mapped_column(Integer, default=None)
    num_assigned: Mapped[int] = mapped_column(Integer, default=0)
    num_received: Mapped[int] = mapped_column(Integer, default=0)
    num_stale: Mapped[int] = mapped_column(Integer, default=0)
    num_dropped: Mapped[int] = mapped_column(Integer, default=0)
    num_rejected: Mapped[int] = mapped_column(Integer, default=0)
    num_declined: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Applied updates the norm bound scaled down (fedge.coordinator.engine.bounds); null is 0.
    num_clipped: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)

    task: Mapped[Task] = relationship(back_populates="rounds")


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (status_check(DeviceStatus),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[DeviceStatus] = mapped_column(
        StatusType(DeviceStatus), default=DeviceStatus.ACTIVE, index=True
    )
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # When the device last reported its capabilities (PUT /device/capabilities).
    capabilities_at: Mapped[datetime | None] = mapped_column(default=None)
    # Labels set at enrollment or by an administrator; tasks may require some of them.
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")
    enrollment_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("enrollment_tokens.id"), default=None
    )
    enrolled_at: Mapped[datetime] = _now_column()
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # Reliability statistics used by selection.
    num_assigned: Mapped[int] = mapped_column(Integer, default=0)
    num_completed: Mapped[int] = mapped_column(Integer, default=0)
    num_dropped: Mapped[int] = mapped_column(Integer, default=0)
    num_declined: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The task's L2 norm bound: updates scaled down at aggregation, uploads refused (422);
    # null is 0.
    num_norm_clipped: Mapped[int | None] = mapped_column(Integer)
    num_norm_refused: Mapped[int | None] = mapped_column(Integer)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("round_id", "device_id"),
        Index("ix_assignments_device_status", "device_id", "status"),
        status_check(AssignmentStatus),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    base_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[AssignmentStatus] = mapped_column(
        StatusType(AssignmentStatus), default=AssignmentStatus.ASSIGNED, index=True
    )
    assigned_at: Mapped[datetime] = _now_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    downloaded_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Set when the device declined the assignment (its status is then ``cancelled``):
    # a reason code (fedge.shared.decline) and the device's own words.
    decline_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    decline_detail: Mapped[str | None] = mapped_column(Text, default=None)


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("device_id", "idempotency_key"),
        Index("ix_updates_task_status", "task_id", "status"),
        status_check(UpdateStatus),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    assignment_id: Mapped[int | None] = mapped_column(
        ForeignKey("assignments.id", ondelete="CASCADE"), unique=True, default=None
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), default=None)
    base_version: Mapped[int] = mapped_column(Integer)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    # The examples that count for the weight (fedge.coordinator.engine.examples); null on rows
    # written before it existed (then the claim capped by the task's max_num_examples).
    num_examples_counted: Mapped[int | None] = mapped_column(BigInteger, default=None)
    blob_digest: Mapped[str] = mapped_column(String(64))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    staleness: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float)
    status: Mapped[UpdateStatus] = mapped_column(
        StatusType(UpdateStatus), default=UpdateStatus.ACCEPTED
    )
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = _now_column()
    applied_version: Mapped[int | None] = mapped_column(Integer, default=None)
    # At aggregation: the update's L2 norm and the factor the norm bound scaled it by (1: not
    # clipped); null until applied.
    norm: Mapped[float | None] = mapped_column(Float)
    clip_scale: Mapped[float | None] = mapped_column(Float)
    # Metrics the device sent with its work (train loss etc.), copied at acceptance.
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(200), default="")
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = _now_column()
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class UsedNonce(Base):
    """Nonces of signed device requests, kept for twice the skew window (replay protection
    that survives restarts and is shared by every coordinator process)."""

    __tablename__ = "used_nonces"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Lease(Base):
    """A named lease (e.g. ``task:3``) held by one coordinator process until it expires.

    On PostgreSQL the scheduler also takes row locks; the lease row is what serializes the
    scheduler across processes on SQLite."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column()


class Blob(Base):
    """A blob kept in the database (``FEDGE_BLOB_URL=database``; fedge.coordinator.blobstore_db):
    its name, size, how many chunks hold its bytes, and when it was last written."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    num_chunks: Mapped[int] = mapped_column(Integer)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BlobChunk(Base):
    """Bytes ``[seq * chunk_size, (seq + 1) * chunk_size)`` of a database blob."""

    __tablename__ = "blob_chunks"

    digest: Mapped[str] = mapped_column(
        ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class SecAggRound(Base):
    """A sync round run with secure aggregation: its public parameters and the phase it is in
    (fedge.coordinator.engine.secure; docs/secure-aggregation.md). Everything a phase decides
    is written here and in :class:`SecAggMember` before the phase is announced."""

    __tablename__ = "secagg_rounds"

    round_id: Mapped[int] = mapped_column(
        ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True
    )
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    seed: Mapped[bytes] = mapped_column(LargeBinary)
    cohort: Mapped[int] = mapped_column(Integer)
    degree: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    k: Mapped[int] = mapped_column(BigInteger)
    grid_bound: Mapped[float] = mapped_column(Float)
    grid_bits: Mapped[int] = mapped_column(Integer)
    # "random": seeded random-k from the round seed (the only kind built so far); the model
    # version the round trains from (what an aggregate-based support would be derived from).
    support_kind: Mapped[str] = mapped_column(String(16))
    support_version: Mapped[int] = mapped_column(Integer)
    # advert, shares, masked, unmask, done or failed.
    phase: Mapped[str] = mapped_column(String(16))
    phase_deadline_at: Mapped[datetime] = mapped_column()
    # The exact uint32 sum of the survivors' quantized inputs once unmasked (k little-endian
    # words), and how many devices it holds.
    result_sum: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    num_included: Mapped[int | None] = mapped_column(Integer, default=None)


class SecAggMember(Base):
    """One selected device of a secure-aggregation round: its cohort index and every message
    it sent or was sent, as bytes (fixed layouts of fedge.shared.secagg.messages)."""

    __tablename__ = "secagg_members"
    __table_args__ = (
        UniqueConstraint("round_id", "cohort_index", name="uq_secagg_members_round_index"),
        UniqueConstraint("round_id", "device_id", name="uq_secagg_members_round_device"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(
        ForeignKey("secagg_rounds.round_id", ondelete="CASCADE"), index=True
    )
    cohort_index: Mapped[int] = mapped_column(Integer)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"))
    # The last phase this device completed (selected, advert, shares, masked, unmask) and
    # whether it was left out of a later one (dropped).
    phase_reached: Mapped[str] = mapped_column(String(16), default="selected")
    dropped: Mapped[bool] = mapped_column(default=False)
    advert: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    shares_out: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    shares_in: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    masked: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    unmask_request: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    unmask_response: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
