"""Structured logs: ``fedge coordinator serve`` with ``FEDGE_LOG_FORMAT=json`` writes one JSON
object per line, and a round's events carry their task, round and device ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.coordinator.logs import JsonFormatter, TextFormatter, log_config
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.support.process import coordinator_process
from tests.support.rounds import (
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)


def records(log_text: str) -> list[dict[str, Any]]:
    """Every line of the log, parsed (a line that is not JSON fails the test)."""
    out = []
    for line in log_text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return out


def events(log_text: str, name: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in records(log_text)
        if r.get("event") == name and all(r.get(k) == v for k, v in fields.items())
    ]


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_rounds_events_are_json_lines_with_their_ids(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    env = {"FEDGE_LOG_FORMAT": "json", "FEDGE_LOG_LEVEL": "info"}
    with (
        coordinator_process(settings, tmp_path / "c", ca_file=tls_paths.ca_cert, env=env) as proc,
        fleet_of(proc, 2) as fleet,
    ):
        task_id = create_task(proc, aggregation=every_device(2, rounds=1))
        uploads = {}
        for device in fleet:
            work = device.work(wait=5)
            assert work is not None
            body = make_update(work, delta=random_delta(spec_of(work), rng), num_examples=5)
            r = device.upload(work, body)
            assert r.status_code == 201, r.text
            uploads[device.device_id] = (work, body, r.json()["update_id"])
        first = fleet[0]
        work, body, _ = uploads[first.device_id]
        assert first.upload(work, body, key="a-second-try").status_code == 409

        # A second task whose round passes its deadline without the updates it needs.
        failing = create_task(proc, aggregation=every_device(2, deadline_s=1, rounds=1))
        for device in fleet:
            assert device.work(wait=5) is not None

        wait_until(lambda: events(proc.log(), "task.finished", task=task_id))
        wait_until(lambda: events(proc.log(), "round.failed", task=failing), timeout=30)
        log_text = proc.log()

    lines = records(log_text)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    # The access log is JSON too.
    assert any(line["logger"] == "uvicorn.access" for line in lines)

    (opened,) = events(log_text, "round.opened", task=task_id)
    round_id = opened["round"]
    assert opened["number"] == 1 and opened["assigned"] == 2 and opened["mode"] == "sync"
    for device_id, (work, body, update_id) in uploads.items():
        (accepted,) = events(log_text, "update.accepted", device=device_id, task=task_id)
        assert accepted["round"] == round_id
        assert accepted["update"] == update_id
        assert accepted["assignment"] == work["assignment_id"]
        assert accepted["bytes"] == len(body)
    (refused,) = events(log_text, "upload.refused")
    assert refused["device"] == first.device_id
    assert refused["error"] == "already_uploaded" and refused["status"] == 409
    assert refused["level"] == "warning"
    (collected,) = events(log_text, "round.aggregating", task=task_id, round=round_id)
    assert collected["reason"] == "target reached"
    (computed,) = events(log_text, "aggregation.computed", task=task_id, round=round_id)
    assert computed["updates"] == 2 and computed["seconds"] >= 0
    (closed,) = events(log_text, "round.closed", task=task_id, round=round_id)
    assert closed["version"] == 1
    (committed,) = events(log_text, "version.committed", task=task_id, version=1)
    assert committed["round"] == round_id and committed["updates"] == 2
    (finished,) = events(log_text, "task.finished", task=task_id)
    assert finished["reason"] == "1 aggregations done"
    assert events(log_text, "task.running", task=task_id)

    # The first failed round (the next rounds fail the same way until the test ends).
    failed = events(log_text, "round.failed", task=failing)[0]
    assert failed["level"] == "warning"
    assert failed["reason"] == "deadline passed with 0 of the 2 updates needed"
    dropped = events(log_text, "assignment.dropped", task=failing, round=failed["round"])
    assert sorted(d["device"] for d in dropped) == sorted(d.device_id for d in fleet)
    # No secret reaches the log: API keys and device signatures.
    assert "fk_" not in log_text and "Fedge " not in log_text


def test_text_lines_carry_the_fields_and_json_lines_parse() -> None:
    record = logging.LogRecord("fedge.coordinator.events", logging.WARNING, "", 0, "x", (), None)
    record.__dict__.update({"event": "round.failed", "task": 4, "reason": "deadline passed"})
    text = TextFormatter().format(record)
    assert text == 'WARNING:  x event=round.failed task=4 reason="deadline passed"'
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["event"] == "round.failed" and parsed["task"] == 4
    assert parsed["level"] == "warning" and parsed["logger"] == "fedge.coordinator.events"


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        log_config("info", "xml")
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


def test_an_event_is_logged_after_commit_and_dropped_on_rollback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    from fedge.coordinator.db import make_engine, make_sessionmaker
    from fedge.coordinator.events import Event, emit, install

    engine = make_engine(f"sqlite:///{tmp_path / 'events.db'}")
    sessions = make_sessionmaker(engine)
    seen: list[Event] = []
    install(sessions, [seen.append])
    caplog.set_level(logging.INFO, logger="fedge.coordinator.events")
    try:
        with sessions() as session:
            session.execute(text("select 1"))
            emit(session, "round.opened", task=1, round=2, name="not a LogRecord attribute")
            assert seen == []  # not before the commit
            session.commit()
        with sessions() as session:
            session.execute(text("select 1"))
            emit(session, "round.failed", task=1, round=3, reason="rolled back")
            session.rollback()
            session.commit()
    finally:
        engine.dispose()
    assert [e.name for e in seen] == ["round.opened"]
    (record,) = caplog.records
    assert record.__dict__["event"] == "round.opened" and record.__dict__["round"] == 2
    assert record.__dict__["field_name"] == "not a LogRecord attribute"
