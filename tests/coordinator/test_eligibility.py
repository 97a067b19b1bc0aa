"""Eligibility: task requirements against device tags and capability reports, the quick
liveness rule, and selection that only takes eligible devices (on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.engine.eligibility import Liveness, Requirements, merged_capabilities
from fedge.coordinator.engine.selection import eligible_devices
from fedge.coordinator.models import Assignment, Device, Round, Task
from fedge.coordinator.states import AssignmentStatus, DeviceStatus, RoundStatus, TaskStatus

DIGITS_CAPS = {
    "trainers": ["softmax", "mlp"],
    "feature_shape": [64],
    "label_kind": "class",
    "num_examples": 100,
}
NEEDS_DIGITS = Requirements.from_stored(
    {"tags": ["lab"], "trainer": "mlp", "feature_shape": [64], "label_kind": "class"}
)


@pytest.mark.parametrize(
    ("tags", "caps", "unmet"),
    [
        (["lab", "x"], DIGITS_CAPS, None),
        (["x"], DIGITS_CAPS, "lacks tag(s) lab"),
        (["lab"], {**DIGITS_CAPS, "trainers": ["softmax"]}, "has no trainer mlp"),
        (["lab"], {**DIGITS_CAPS, "feature_shape": [8, 8]}, "feature shape [8, 8], not [64]"),
        (["lab"], {**DIGITS_CAPS, "feature_shape": None}, "feature shape unreported, not [64]"),
        (["lab"], {**DIGITS_CAPS, "label_kind": "value"}, "labels value, not class"),
        (["lab"], {}, "has no trainer mlp"),
        (None, None, "lacks tag(s) lab"),
    ],
)
def test_requirements_name_the_first_one_a_device_does_not_meet(
    tags: list[str] | None, caps: dict[str, Any] | None, unmet: str | None
) -> None:
    assert NEEDS_DIGITS.unmet(tags, caps) == unmet


def test_no_requirements_take_any_device_and_min_examples_counts() -> None:
    assert Requirements.from_stored({}).empty
    assert Requirements.from_stored(None).unmet(None, None) is None
    few = Requirements.from_stored({"min_examples": 101})
    assert few.unmet([], DIGITS_CAPS) == "holds 100 examples, fewer than 101"
    assert Requirements.from_stored({"min_examples": 100}).unmet([], DIGITS_CAPS) is None
    assert few.describe() == ">= 101 examples"


def test_a_report_replaces_what_it_reports_and_keeps_enrollment_keys() -> None:
    first = merged_capabilities({"cpus": 4}, {**DIGITS_CAPS, "poll_interval_s": 5.0})
    second = merged_capabilities(first, {"trainers": ["mlp"], "feature_shape": None})
    assert second == {"cpus": 4, "trainers": ["mlp"]}


@pytest.mark.parametrize(
    ("caps", "window"),
    [
        ({}, 3 * 60.0),  # no report: the longest a poll holds a device unseen
        ({"poll_interval_s": 5.0}, 15.0),
        ({"poll_interval_s": 0.01}, 3.0),  # at least a second per poll
        ({"poll_interval_s": 3600.0}, 180.0),  # a poll never waits longer than the maximum
        ({"poll_interval_s": True}, 180.0),  # not a number
    ],
)
def test_the_liveness_window_is_k_poll_intervals(caps: dict[str, Any], window: float) -> None:
    assert Liveness(polls=3, default_poll_s=60, max_window_s=600).window_s(caps) == window


def test_the_seen_window_setting_caps_the_liveness_window() -> None:
    assert Liveness(polls=20, default_poll_s=60, max_window_s=600).window_s({}) == 600


# ------------------------------------------------------------------ selection on a database


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=utcnow().tzinfo)
LIVENESS = Liveness(polls=3, default_poll_s=60, max_window_s=600)


def add_device(
    session: Session,
    device_id: str,
    *,
    seen_s_ago: float | None = 1.0,
    tags: list[str] | None = None,
    caps: dict[str, Any] | None = None,
    reported_s_ago: float | None = None,
    status: DeviceStatus = DeviceStatus.ACTIVE,
) -> None:
    session.add(
        Device(
            id=device_id,
            name=device_id,
            public_key=f"key-{device_id}",
            status=status,
            tags=tags or [],
            capabilities=caps or {},
            capabilities_at=None
            if reported_s_ago is None
            else NOW - timedelta(seconds=reported_s_ago),
            last_seen_at=None if seen_s_ago is None else NOW - timedelta(seconds=seen_s_ago),
        )
    )


def add_round(session: Session) -> Round:
    task = Task(
        name="t",
        status=TaskStatus.RUNNING,
        model_config_={},
        model_spec=[],
        aggregation={},
        compression={},
        training={},
        current_version=0,
    )
    session.add(task)
    session.flush()
    rnd = Round(task_id=task.id, number=1, base_version=0, status=RoundStatus.OPEN)
    session.add(rnd)
    session.flush()
    return rnd


def assign(
    session: Session,
    rnd: Round,
    device_id: str,
    status: AssignmentStatus,
    *,
    declined_s_ago: float | None = None,
) -> None:
    session.add(
        Assignment(
            task_id=rnd.task_id,
            round_id=rnd.id,
            device_id=device_id,
            base_version=0,
            status=status,
            decline_reason=None if declined_s_ago is None else "no_trainer",
            finished_at=None if declined_s_ago is None else NOW - timedelta(seconds=declined_s_ago),
        )
    )
    session.flush()


def eligible(session: Session, **kwargs: Any) -> list[str]:
    return [c.device_id for c in eligible_devices(session, now=NOW, liveness=LIVENESS, **kwargs)]


def test_selection_takes_only_devices_that_meet_the_requirements(
    sessions: sessionmaker[Session],
) -> None:
    with session_scope(sessions) as session:
        add_device(session, "a-fits", tags=["lab"], caps=DIGITS_CAPS)
        add_device(session, "b-untagged", caps=DIGITS_CAPS)
        add_device(
            session, "c-wrong-shape", tags=["lab"], caps={**DIGITS_CAPS, "feature_shape": [30]}
        )
        add_device(session, "d-no-report", tags=["lab"])
        add_device(
            session, "e-revoked", tags=["lab"], caps=DIGITS_CAPS, status=DeviceStatus.REVOKED
        )
        add_device(session, "f-fits", tags=["lab", "gpu"], caps=DIGITS_CAPS)
    with session_scope(sessions, read_only=True) as session:
        assert eligible(session, requirements=NEEDS_DIGITS) == ["a-fits", "f-fits"]
        assert eligible(session) == [
            "a-fits",
            "b-untagged",
            "c-wrong-shape",
            "d-no-report",
            "f-fits",
        ]


def test_devices_that_stopped_polling_leave_the_selectable_set_after_k_polls(
    sessions: sessionmaker[Session],
) -> None:
    fast = {"poll_interval_s": 5.0}  # window 15 s
    with session_scope(sessions) as session:
        add_device(session, "fast-live", seen_s_ago=14, caps=fast)
        add_device(session, "fast-gone", seen_s_ago=16, caps=fast)
        add_device(session, "slow-live", seen_s_ago=179)  # no report: 3 x 60 s
        add_device(session, "slow-gone", seen_s_ago=181)
        add_device(session, "never-seen", seen_s_ago=None)
    with session_scope(sessions, read_only=True) as session:
        assert eligible(session) == ["fast-live", "slow-live"]


def test_busy_devices_round_members_and_devices_that_declined_are_left_out(
    sessions: sessionmaker[Session],
) -> None:
    with session_scope(sessions) as session:
        for name in ("busy", "member", "declined", "declined-then-reported", "idle"):
            add_device(
                session, name, reported_s_ago=30 if name == "declined-then-reported" else None
            )
        rnd = add_round(session)
        task_id, round_id = rnd.task_id, rnd.id
        assign(session, rnd, "busy", AssignmentStatus.DOWNLOADED)
        assign(session, rnd, "member", AssignmentStatus.UPLOADED)
        assign(session, rnd, "declined", AssignmentStatus.CANCELLED, declined_s_ago=60)
        # it declined, then reported new capabilities: it is offered the task again
        assign(
            session, rnd, "declined-then-reported", AssignmentStatus.CANCELLED, declined_s_ago=60
        )
    with session_scope(sessions, read_only=True) as session:
        assert eligible(session) == ["declined", "declined-then-reported", "idle", "member"]
        assert eligible(session, task_id=task_id) == ["declined-then-reported", "idle", "member"]
        assert eligible(session, task_id=task_id, not_in_round=round_id) == ["idle"]
