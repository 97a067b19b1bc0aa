"""Named leases on each backend: one holder at a time, taken over only once expired."""

from __future__ import annotations

from datetime import timedelta

from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope, utcnow
from fedge.coordinator.engine import leases


def test_a_lease_has_one_holder_until_it_expires(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    t0 = utcnow()

    def acquire(holder: str, at: float) -> bool:
        with session_scope(sessions) as session:
            now = t0 + timedelta(seconds=at)
            return leases.acquire(session, "task:1", holder=holder, ttl_s=10, now=now)

    def renew(holder: str, at: float) -> set[str]:
        with session_scope(sessions) as session:
            now = t0 + timedelta(seconds=at)
            return leases.renew(session, ["task:1", "task:2"], holder=holder, ttl_s=10, now=now)

    try:
        assert acquire("a", 0)  # a new lease
        assert not acquire("b", 1)  # held
        assert acquire("a", 5)  # ours: renewed until 15
        assert not acquire("b", 12)
        assert renew("a", 14) == {"task:1"}  # until 24; task:2 was never held
        assert renew("b", 14) == set()
        assert not acquire("b", 20)
        assert acquire("b", 25)  # expired: taken over
        assert renew("a", 26) == set()  # the old holder cannot renew it back
        assert not acquire("a", 26)
    finally:
        engine.dispose()
