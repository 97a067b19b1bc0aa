"""Which devices can work on a task, and which are still reachable (docs/rounds.md,
"Eligibility" and "Liveness").

A task's ``requirements`` (:class:`~fedge.coordinator.schemas.targeting.TaskRequirements`)
are matched against a device's ``tags`` (set at enrollment or by an administrator) and its
``capabilities`` (what its agent last reported). A requirement the device has not reported
on is not met: a task that needs ``feature_shape: [64]`` never goes to a device that did not
say what its data looks like. A task without requirements takes any device.

Liveness: a device is selectable while it was seen within ``k`` of its poll intervals, ``k``
being ``settings.device_liveness_polls``. The interval is what the device reported
(``poll_interval_s``), at most ``settings.long_poll_max_s`` (a poll never waits longer, so a
live device polls again by then) and at least one second; without a report it is
``long_poll_max_s``. ``settings.device_seen_window_s`` caps the window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fedge.coordinator.settings import Settings

#: Capability keys a report (``PUT /device/capabilities``) sets or clears.
REPORTED_KEYS = ("trainers", "feature_shape", "label_kind", "num_examples", "poll_interval_s")
#: The shortest poll interval the liveness rule assumes.
MIN_POLL_S = 1.0


@dataclass(frozen=True)
class Liveness:
    """The rule that decides whether a device is still reachable (see the module doc)."""

    polls: float = 3.0
    default_poll_s: float = 60.0
    max_window_s: float = 600.0
    #: A paced fleet (fedge.coordinator.engine.pace): its check-in period and selection
    #: window, and every device's window is ``max_window_s`` whatever it reported.
    paced_period_s: float | None = None
    paced_window_s: float | None = None
    fixed_window: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Liveness:
        return cls(
            polls=settings.device_liveness_polls,
            default_poll_s=max(float(settings.long_poll_max_s), MIN_POLL_S),
            max_window_s=float(settings.device_seen_window_s),
        )

    def window_s(self, capabilities: Mapping[str, Any] | None) -> float:
        """Seconds the device may stay unseen and still count as reachable."""
        return self.window_for((capabilities or {}).get("poll_interval_s"))

    def window_for(self, poll_interval_s: object) -> float:
        """:meth:`window_s` for a device that reported ``poll_interval_s`` (None: none)."""
        if self.fixed_window:
            return self.max_window_s
        interval = self.default_poll_s
        reported = poll_interval_s
        if (
            isinstance(reported, int | float)
            and not isinstance(reported, bool)
            and math.isfinite(reported)
            and reported > 0
        ):
            interval = min(max(float(reported), MIN_POLL_S), self.default_poll_s)
        return min(self.polls * interval, self.max_window_s)

    @property
    def longest_window_s(self) -> float:
        """The largest window any device can have (a cheap SQL pre-filter)."""
        return min(self.polls * self.default_poll_s, self.max_window_s)

    def is_live(
        self, last_seen_at: datetime | None, capabilities: Mapping[str, Any] | None, now: datetime
    ) -> bool:
        if last_seen_at is None:
            return False
        return now - last_seen_at <= timedelta(seconds=self.window_s(capabilities))


def _shape(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return None
    return tuple(value)


@dataclass(frozen=True)
class Requirements:
    """A task's stored ``requirements``, parsed (unknown keys are ignored)."""

    tags: frozenset[str] = frozenset()
    trainer: str | None = None
    feature_shape: tuple[int, ...] | None = None
    label_kind: str | None = None
    min_examples: int | None = None

    @classmethod
    def from_stored(cls, data: Mapping[str, Any] | None) -> Requirements:
        data = data if isinstance(data, Mapping) else {}
        tags = data.get("tags") or []
        min_examples = data.get("min_examples")
        return cls(
            tags=frozenset(str(t) for t in tags) if isinstance(tags, list) else frozenset(),
            trainer=str(data["trainer"]) if data.get("trainer") else None,
            feature_shape=_shape(data.get("feature_shape")),
            label_kind=str(data["label_kind"]) if data.get("label_kind") else None,
            min_examples=int(min_examples) if isinstance(min_examples, int) else None,
        )

    @property
    def empty(self) -> bool:
        return self == Requirements()

    def unmet(
        self, tags: Sequence[Any] | None, capabilities: Mapping[str, Any] | None
    ) -> str | None:
        """The first requirement the device does not meet, in words; ``None`` when it meets
        them all."""
        caps = capabilities if isinstance(capabilities, Mapping) else {}
        if self.tags:
            missing = sorted(self.tags - {str(t) for t in (tags or [])})
            if missing:
                return f"lacks tag(s) {', '.join(missing)}"
        if self.trainer is not None:
            trainers = caps.get("trainers")
            if not isinstance(trainers, list) or self.trainer not in trainers:
                return f"has no trainer {self.trainer}"
        if self.feature_shape is not None:
            shape = _shape(caps.get("feature_shape"))
            if shape != self.feature_shape:
                have = "unreported" if shape is None else list(shape)
                return f"feature shape {have}, not {list(self.feature_shape)}"
        if self.label_kind is not None and caps.get("label_kind") != self.label_kind:
            return f"labels {caps.get('label_kind') or 'unreported'}, not {self.label_kind}"
        if self.min_examples is not None:
            held = caps.get("num_examples")
            if not isinstance(held, int) or isinstance(held, bool) or held < self.min_examples:
                return (
                    f"holds {held if isinstance(held, int) else 'unreported'} examples, "
                    f"fewer than {self.min_examples}"
                )
        return None

    def describe(self) -> str:
        """The requirements in a few words (for status reasons)."""
        parts: list[str] = []
        if self.tags:
            parts.append("tags " + ", ".join(sorted(self.tags)))
        if self.trainer is not None:
            parts.append(f"trainer {self.trainer}")
        if self.feature_shape is not None:
            parts.append(f"feature shape {list(self.feature_shape)}")
        if self.label_kind is not None:
            parts.append(f"{self.label_kind} labels")
        if self.min_examples is not None:
            parts.append(f">= {self.min_examples} examples")
        return "; ".join(parts) if parts else "none"


def merged_capabilities(
    current: Mapping[str, Any] | None, report: Mapping[str, Any]
) -> dict[str, Any]:
    """A device's capabilities after a report: the reported keys replaced (the ones left out
    of the report removed), every other key kept."""
    kept = {k: v for k, v in (current or {}).items() if k not in REPORTED_KEYS}
    return {**kept, **{k: v for k, v in report.items() if v is not None}}
