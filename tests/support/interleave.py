"""Force one interleaving of two database writers, to pin a race down in a test.

:func:`interleave` runs ``first`` in a thread until it has executed a statement that
``pause_at`` matches (an ``after_cursor_execute`` hook on the engine ``first`` uses), holds it
there, and runs ``second``. ``first`` is released as soon as ``second`` has finished, or has
been seen waiting for a lock ``first`` holds (``pg_stat_activity``): in the first case the
test got the interleaving it wanted, in the second the code under test serialized the two
writers (which is the fix for such races). Both results are returned for the test to check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event, text

Matcher = Callable[[Any, str], bool]


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _run(fn: Callable[[], Any], outcome: Outcome) -> None:
    try:
        outcome.value = fn()
    except BaseException as exc:  # handed to the test
        outcome.error = exc
    finally:
        outcome.done.set()


def lock_waiters(engine: Engine) -> int:
    """Sessions of this database waiting for a lock (PostgreSQL)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def interleave(
    first: Callable[[], Any],
    second: Callable[[], Any],
    *,
    engine: Engine,
    pause_at: Matcher,
    observer: Engine,
    any_thread: bool = False,
    timeout_s: float = 60.0,
) -> tuple[Outcome, Outcome, bool]:
    """Run ``first`` up to ``pause_at``, then ``second``; release ``first`` when ``second`` is
    done or blocked. Returns both outcomes and whether ``second`` was blocked by ``first``.

    The pause applies to statements of ``first``'s own thread, or with ``any_thread`` to the
    first matching statement on ``engine`` from any thread (``first`` sends a request that a
    server thread executes)."""
    paused = threading.Event()
    release = threading.Event()
    owner: dict[str, int | None] = {"thread": None}

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        mine = any_thread or threading.get_ident() == owner["thread"]
        if not mine or paused.is_set():
            return
        if pause_at(conn, statement):
            paused.set()
            release.wait(timeout_s)

    def run_first() -> Any:
        owner["thread"] = threading.get_ident()
        return first()

    event.listen(engine, "after_cursor_execute", hook)
    a, b = Outcome(), Outcome()
    try:
        t1 = threading.Thread(target=_run, args=(run_first, a), daemon=True)
        t1.start()
        while not paused.wait(0.01):
            if a.done.is_set():
                raise AssertionError(f"first writer never reached its pause point ({a.error!r})")
        t2 = threading.Thread(target=_run, args=(second, b), daemon=True)
        t2.start()
        blocked = False
        waited = 0.0
        while not b.done.wait(0.02):
            waited += 0.02
            if lock_waiters(observer) > 0:
                blocked = True
                break
            if waited > timeout_s:
                raise AssertionError("second writer neither finished nor blocked")
        release.set()
        t1.join(timeout_s)
        t2.join(timeout_s)
        assert a.done.is_set() and b.done.is_set(), "a writer did not finish"
    finally:
        release.set()
        event.remove(engine, "after_cursor_execute", hook)
    return a, b, blocked
