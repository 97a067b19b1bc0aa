"""Parsed task configurations, kept per coordinator process (``Runtime.task_configs``).

Every upload of a task needs its model spec, compression policy and aggregation config as
objects, and every work answer the task's configuration and its ``config_digest``; reading
and parsing the JSON columns each time costs more than the rest of the check. Two ways in:

- :meth:`TaskConfigCache.get` (an ORM ``Task`` at hand): an entry is reused while the task's
  columns still equal (as JSON values) the ones it was parsed from, so an edited task is
  parsed again;
- :meth:`TaskConfigCache.lookup` (the request path, SQLAlchemy Core): by task id and the
  task's ``updated_at`` alone, without reading the JSON columns. Every change of a task's
  configuration (a draft edit, or training settings taking effect at a round of a live task)
  also sets ``updated_at``, so an entry stays right until that stamp moves; an entry is made
  only for a task that has left draft (a draft's edits may land within one clock tick).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from fedge.coordinator.engine.config import AggregationConfig, ConfigError
from fedge.coordinator.engine.eligibility import Requirements
from fedge.coordinator.models import Task
from fedge.coordinator.states import TaskStatus
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy


def config_digest_of(compression: Any, training: Any, model_config: Any, model_spec: Any) -> str:
    """A short digest of the parts of a work answer a device can keep between assignments
    of one task (what the work poll's ``known`` refers to)."""
    canonical = json.dumps(
        [compression, training, model_config, model_spec],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def mode_of(aggregation: Any) -> str:
    """``sync`` or ``async`` (``sync`` for anything unreadable)."""
    mode = (aggregation or {}).get("mode", "sync") if isinstance(aggregation, dict) else "sync"
    return mode if mode in ("sync", "async") else "sync"


def secure_of(aggregation: Any) -> bool:
    """Whether a stored aggregation config asks for secure aggregation."""
    return isinstance(aggregation, dict) and bool(aggregation.get("secure"))


@dataclass(frozen=True)
class ParsedTask:
    """A task's spec, policy and aggregation config, and the JSON they were parsed from.

    ``config`` is None when the aggregation config is unusable (``config_error`` says why);
    the JSON values are shared by every request: never change them in place."""

    model_spec: Any
    compression: Any
    aggregation: Any
    training: Any
    model_config: Any
    spec: ModelSpec
    policy: CompressionPolicy
    config: AggregationConfig | None
    config_error: str | None
    mode: str
    config_digest: str
    requirements: Requirements = field(default_factory=Requirements)


def _parse(
    *,
    model_spec: Any,
    compression: Any,
    aggregation: Any,
    training: Any,
    model_config: Any,
    requirements: Any = None,
) -> ParsedTask:
    config: AggregationConfig | None
    try:
        config, error = AggregationConfig.from_dict(aggregation), None
    except ConfigError as exc:
        config, error = None, str(exc)
    return ParsedTask(  # copies: the session's JSON values may be changed in place later
        model_spec=copy.deepcopy(model_spec),
        compression=copy.deepcopy(compression),
        aggregation=copy.deepcopy(aggregation),
        training=copy.deepcopy(training),
        model_config=copy.deepcopy(model_config),
        spec=ModelSpec.from_dict(model_spec),
        policy=CompressionPolicy.from_dict(compression),
        config=config,
        config_error=error,
        mode=mode_of(aggregation),
        config_digest=config_digest_of(compression, training, model_config, model_spec),
        requirements=Requirements.from_stored(requirements),
    )


_CONFIG_COLUMNS = select(
    Task.status,
    Task.model_spec,
    Task.compression,
    Task.aggregation,
    Task.training,
    Task.model_config_,
    Task.requirements,
)


class TaskConfigCache:
    """Task id -> :class:`ParsedTask`, at most ``max_entries`` (then it starts over)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: dict[int, ParsedTask] = {}
        self._frozen: dict[int, tuple[datetime, ParsedTask]] = {}
        self.parsed = 0  # parses so far (for tests and diagnostics)

    def get(self, task: Task) -> ParsedTask:
        """The parsed configuration of ``task``; ``ConfigError`` when its aggregation config
        is unusable (nothing is cached then)."""
        hit = self._entries.get(task.id)
        if (
            hit is not None
            and hit.model_spec == task.model_spec
            and hit.compression == task.compression
            and hit.aggregation == task.aggregation
            and hit.training == task.training
            and hit.model_config == task.model_config_
            and hit.requirements == Requirements.from_stored(task.requirements)
        ):
            return hit
        parsed = self._parse_task(
            model_spec=task.model_spec,
            compression=task.compression,
            aggregation=task.aggregation,
            training=task.training,
            model_config=task.model_config_,
            requirements=task.requirements,
        )
        if parsed.config is None:
            raise ConfigError(parsed.config_error or "unusable aggregation config")
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[task.id] = parsed
        return parsed

    def lookup(self, conn: Connection, task_id: int, updated_at: datetime) -> ParsedTask:
        """The parsed configuration of the task ``task_id`` as of ``updated_at`` (read and
        parsed again whenever that stamp moves; an unusable aggregation config gives
        ``config=None``). ``LookupError`` when there is no such task."""
        hit = self._frozen.get(task_id)
        if hit is not None and hit[0] == updated_at:
            return hit[1]
        row = conn.execute(_CONFIG_COLUMNS.where(Task.id == task_id)).first()
        if row is None:
            raise LookupError(f"no task {task_id}")
        status, model_spec, compression, aggregation, training, model_config, requirements = row
        parsed = self._parse_task(
            model_spec=model_spec,
            compression=compression,
            aggregation=aggregation,
            training=training,
            model_config=model_config,
            requirements=requirements,
        )
        if status != TaskStatus.DRAFT:
            if len(self._frozen) >= self.max_entries:
                self._frozen.clear()
            self._frozen[task_id] = (updated_at, parsed)
        return parsed

    def _parse_task(self, **columns: Any) -> ParsedTask:
        self.parsed += 1
        return _parse(**columns)
