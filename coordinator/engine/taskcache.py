"""Parsed task configurations, kept per coordinator process (``Runtime.task_configs``).

Every upload of a task needs its model spec, compression policy and aggregation config as
objects; parsing the JSON columns each time costs more than the rest of the check. An entry
is reused while the task's columns still equal (as JSON values) the ones it was parsed from,
so an edited task is parsed again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.models import Task
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy


@dataclass(frozen=True)
class ParsedTask:
    """A task's spec, policy and aggregation config, and the JSON they were parsed from."""

    model_spec: Any
    compression: Any
    aggregation: Any
    spec: ModelSpec
    policy: CompressionPolicy
    config: AggregationConfig


class TaskConfigCache:
    """Task id -> :class:`ParsedTask`, at most ``max_entries`` (then it starts over)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: dict[int, ParsedTask] = {}

    def get(self, task: Task) -> ParsedTask:
        """The parsed configuration of ``task``; ``ConfigError`` when its aggregation config
        is unusable (nothing is cached then)."""
        hit = self._entries.get(task.id)
        if (
            hit is not None
            and hit.model_spec == task.model_spec
            and hit.compression == task.compression
            and hit.aggregation == task.aggregation
        ):
            return hit
        parsed = ParsedTask(  # copies: the session's JSON values may be changed in place later
            model_spec=copy.deepcopy(task.model_spec),
            compression=copy.deepcopy(task.compression),
            aggregation=copy.deepcopy(task.aggregation),
            spec=ModelSpec.from_dict(task.model_spec),
            policy=CompressionPolicy.from_dict(task.compression),
            config=AggregationConfig.from_dict(task.aggregation),
        )
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[task.id] = parsed
        return parsed
