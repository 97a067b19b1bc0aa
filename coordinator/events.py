"""Round and task events: logged (and counted) once the transaction that made them commits.

The round engine decides inside transactions that may still roll back (another writer moved
the round first, a commit failed). An event is therefore queued on the session with
:func:`emit` and reaches the log, and the event hooks (metrics,
:mod:`fedge.coordinator.metrics`), only after a commit; a rollback discards it. Events that
happen outside a transaction (an aggregation computed) go straight out with :func:`publish`.

Each event is one log record on the ``fedge.coordinator.events`` logger at INFO (WARNING for
failures and refusals) whose ``event`` field names it, with the ids it concerns as fields
(``task``, ``round``, ``device``, ``version``, ...). docs/operations.md lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("fedge.coordinator.events")

_PENDING = "fedge_events"
#: ``LogRecord`` attributes a field may not overwrite (``logging`` refuses them in ``extra``).
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

#: Events logged at WARNING: something did not go as planned.
_WARNINGS = frozenset({"round.failed", "task.failed", "upload.refused", "aggregation.failed"})


@dataclass(frozen=True)
class Event:
    """One event: a dotted name (``round.opened``) and its fields."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)

    def message(self) -> str:
        detail = self.fields.get("reason")
        return f"{self.name}: {detail}" if detail else self.name


Hook = Callable[[Event], None]


def emit(session: Session, name: str, /, **fields: Any) -> None:
    """Queue an event on ``session``; it goes out if and when the transaction commits."""
    session.info.setdefault(_PENDING, []).append(Event(name, fields))


def publish(event: Event, hooks: list[Hook] | tuple[Hook, ...] = ()) -> None:
    """Log ``event`` and hand it to each hook (a failing hook is logged, never raised)."""
    level = logging.WARNING if event.name in _WARNINGS else logging.INFO
    fields = {(f"field_{k}" if k in _RESERVED else k): v for k, v in event.fields.items()}
    log.log(level, event.message(), extra={"event": event.name, **fields})
    for hook in hooks:
        try:
            hook(event)
        except Exception:
            log.exception("event hook failed for %s", event.name)


def install(factory: sessionmaker[Session], hooks: list[Hook]) -> None:
    """Publish the events of ``factory``'s sessions after each commit, through ``hooks``."""

    def _committed(session: Session) -> None:
        for queued in session.info.pop(_PENDING, ()):
            publish(queued, hooks)

    def _rolled_back(session: Session) -> None:
        session.info.pop(_PENDING, None)

    sa_event.listen(factory, "after_commit", _committed)
    sa_event.listen(factory, "after_rollback", _rolled_back)
