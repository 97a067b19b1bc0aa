"""What one running coordinator holds: settings, database engine, sessions, blob store.

Built in the app's lifespan (never at import time) and reachable from requests as
``request.app.state.runtime``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from coordinator.blobstore import BlobStore
from coordinator.db import make_engine, make_sessionmaker
from coordinator.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    # Filled by the round engine (notifier, scheduler) when the app starts.
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            blobs=BlobStore(settings.blobs),
        )

    def close(self) -> None:
        self.engine.dispose()
