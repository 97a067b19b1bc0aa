"""Waiting long-polls are re-checked and woken in batches, with the answers of their own
checks; the upload path's one-statement nonce and read-only first transaction."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from fedge.coordinator.auth import _insert_nonce
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.engine.config import ConfigError
from fedge.coordinator.engine.longpoll import BatchChecker, get_checker
from fedge.coordinator.engine.notify import Notifier
from fedge.coordinator.engine.taskcache import TaskConfigCache
from fedge.coordinator.models import Device, Task
from fedge.coordinator.settings import Settings
from tests.coordinator.conftest import Coordinator
from tests.support.device import API
from tests.support.rounds import Db, action, create_task, fleet_of, wait_until

LONG_WAIT = 30


def _notifier(coordinator: Coordinator) -> Notifier:
    notifier = coordinator.app.state.runtime.notifier
    assert isinstance(notifier, Notifier)
    return notifier


def _checker(coordinator: Coordinator) -> BatchChecker:
    return get_checker(coordinator.app.state.runtime)


def test_a_round_opened_for_many_waiting_devices_answers_them_from_few_batches(
    coordinator: Coordinator,
) -> None:
    n = 12
    with fleet_of(coordinator, n) as fleet, ThreadPoolExecutor(max_workers=n) as pool:
        polls = [pool.submit(d.work, wait=LONG_WAIT) for d in fleet]
        wait_until(lambda: all(_notifier(coordinator).waiting(d.device_id) for d in fleet))
        before = _checker(coordinator).batches
        started = time.monotonic()
        create_task(
            coordinator,
            aggregation={"mode": "sync", "clients_per_round": n, "round_deadline_s": 60},
        )
        answers = [p.result(timeout=LONG_WAIT) for p in polls]
        assert time.monotonic() - started < LONG_WAIT / 3
        batches = _checker(coordinator).batches - before
        # The same answers as each device's own check gives.
        for device, answer in zip(fleet, answers, strict=True):
            assert answer is not None and answer["status"] == "assigned"
            again = device.work(wait=0)
            assert again == answer
    assert 1 <= batches < n
    assert _checker(coordinator).failures == 0  # answered by the batch, not by the fallback


def test_a_re_check_sees_a_change_no_signal_announced(
    coordinator: Coordinator, db: Db, settings: Settings
) -> None:
    """A change made by another process (here: directly in the database, no in-process
    signal) reaches a waiting poll at its next re-check."""
    assert settings.long_poll_recheck_s < 1
    with fleet_of(coordinator, 1) as fleet, ThreadPoolExecutor(max_workers=1) as pool:
        device = fleet[0]
        poll = pool.submit(device.get, f"{API}/device/work", params={"wait": LONG_WAIT})
        wait_until(lambda: _notifier(coordinator).waiting(device.device_id) == 1)
        started = time.monotonic()
        with session_scope(db.sessions) as session:
            session.execute(
                update(Device).where(Device.id == device.device_id).values(status="revoked")
            )
        r = poll.result(timeout=LONG_WAIT)
        assert time.monotonic() - started < LONG_WAIT / 3
    assert (r.status_code, r.json()["error"]) == (403, "device_revoked")


def test_an_idle_poll_re_checks_in_batches_and_answers_nothing_at_its_deadline(
    coordinator: Coordinator,
) -> None:
    with fleet_of(coordinator, 3) as fleet, ThreadPoolExecutor(max_workers=3) as pool:
        before = _checker(coordinator).batches
        polls = [pool.submit(d.work, wait=1) for d in fleet]
        assert [p.result(timeout=LONG_WAIT) for p in polls] == [None, None, None]
    assert _checker(coordinator).batches > before
    assert _checker(coordinator).failures == 0


def test_a_nonce_is_recorded_once_and_an_expired_one_is_taken_over(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    now = utcnow()
    ttl = timedelta(seconds=60)
    try:
        with session_scope(sessions) as session:
            session.add(Device(id="dev-n", name="n", public_key="A" * 44, status="active"))
        with session_scope(sessions) as session:
            assert _insert_nonce(session, "dev-n", "a" * 32, now=now, ttl=ttl)
        with session_scope(sessions) as session:
            assert not _insert_nonce(session, "dev-n", "a" * 32, now=now, ttl=ttl)
            assert _insert_nonce(session, "dev-n", "b" * 32, now=now, ttl=ttl)
        later = now + 2 * ttl  # the first row has expired (not yet pruned)
        with session_scope(sessions) as session:
            assert _insert_nonce(session, "dev-n", "a" * 32, now=later, ttl=ttl)
        with session_scope(sessions) as session:
            assert not _insert_nonce(session, "dev-n", "a" * 32, now=later, ttl=ttl)
    finally:
        engine.dispose()


def test_a_read_only_transaction_does_not_wait_for_the_sqlite_write_lock(
    tmp_path: pytest.TempPathFactory,
) -> None:
    url = f"sqlite:///{tmp_path}/ro.db"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        sessions = make_sessionmaker(engine)
        with session_scope(sessions) as writer:
            writer.connection().exec_driver_sql("INSERT INTO t VALUES (2)")  # holds the lock
            started = time.monotonic()
            with session_scope(sessions, read_only=True) as reader:
                rows = reader.connection().exec_driver_sql("SELECT count(*) FROM t").scalar()
            assert rows == 1  # the committed snapshot, without waiting
            assert time.monotonic() - started < 5  # BEGIN IMMEDIATE would wait 30 s
    finally:
        engine.dispose()


def test_parsed_task_configuration_follows_a_changed_task() -> None:
    task = Task(
        id=987654,
        name="p",
        model_spec=[{"name": "w", "shape": [2, 2]}],
        compression={"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False},
        aggregation={"mode": "async", "buffer_size": 3},
    )
    cache = TaskConfigCache()
    first = cache.get(task)
    assert cache.get(task) is first
    task.aggregation = {"mode": "async", "buffer_size": 5}
    second = cache.get(task)
    assert second is not first and second.config.buffer_size == 5
    task.model_spec = [{"name": "w", "shape": [3]}]
    assert cache.get(task).spec.num_params == 3
    # A configuration the engine cannot use is not cached.
    task.aggregation = {"mode": "async", "buffer_size": 0}
    with pytest.raises(ConfigError):
        cache.get(task)


def test_the_request_path_parses_a_started_task_once(coordinator: Coordinator) -> None:
    """``lookup`` reads and parses a task's configuration once after it left draft; a draft
    (whose configuration may still change) is read again every time."""
    runtime = coordinator.app.state.runtime
    task_id = create_task(coordinator, aggregation={"mode": "async"}, start=False)
    cache = TaskConfigCache()
    with runtime.engine.connect() as conn:
        created = conn.execute(select(Task.created_at).where(Task.id == task_id)).scalar_one()
        draft = cache.lookup(conn, task_id, created)
        assert cache.lookup(conn, task_id, created) is not draft
        assert cache.parsed == 2
    action(coordinator, task_id, "start")
    with runtime.engine.connect() as conn:
        first = cache.lookup(conn, task_id, created)
        assert cache.lookup(conn, task_id, created) is first
        assert cache.parsed == 3
        assert first.config is not None and first.mode == draft.mode
        assert first.config_digest == draft.config_digest
        with pytest.raises(LookupError):
            cache.lookup(conn, task_id + 1000, created)
