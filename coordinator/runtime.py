"""What one running coordinator holds: settings, database engine, sessions, blob store, and
the per-process parts of the engine and of device authentication.

Built in the app's lifespan (never at import time) and reachable from requests as
``request.app.state.runtime``. Each part has a typed field:

- ``notifier``, ``scheduler``: set by the round engine when the app starts
  (:mod:`fedge.coordinator.engine.lifecycle`); ``None`` without it (an API-only process has no
  scheduler, a runtime opened by a script has neither);
- ``authenticator``, ``slots``, ``batch_checker``, ``pacer``: made on first use by their modules'
  ``get_*`` functions (device authentication, per-device slots, batched long-poll checks);
- ``task_configs``: parsed task configurations, reused while a task's JSON is unchanged;
- ``metrics``: the app's Prometheus metrics (``None`` outside an app, or when disabled);
- ``event_hooks``: called with each round and task event once its transaction committed
  (:mod:`fedge.coordinator.events`; the metrics count rounds there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.blobstore_db import open_blob_store
from fedge.coordinator.db import make_engine, make_sessionmaker
from fedge.coordinator.engine.decodedcache import DecodedCache
from fedge.coordinator.engine.taskcache import TaskConfigCache
from fedge.coordinator.events import Hook, install
from fedge.coordinator.settings import Settings

if TYPE_CHECKING:
    from fedge.coordinator.auth import DeviceAuthenticator, DeviceSlots
    from fedge.coordinator.engine.longpoll import BatchChecker
    from fedge.coordinator.engine.notify import Notifier
    from fedge.coordinator.engine.pace import Pacer
    from fedge.coordinator.engine.scheduler import Scheduler
    from fedge.coordinator.metrics import Metrics


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    notifier: Notifier | None = None
    scheduler: Scheduler | None = None
    authenticator: DeviceAuthenticator | None = None
    slots: DeviceSlots | None = None
    batch_checker: BatchChecker | None = None
    pacer: Pacer | None = None
    task_configs: TaskConfigCache = field(default_factory=TaskConfigCache)
    decoded: DecodedCache = field(default_factory=lambda: DecodedCache(0))
    metrics: Metrics | None = None
    event_hooks: list[Hook] = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings.database_url)
        runtime = cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            blobs=open_blob_store(settings),
            decoded=DecodedCache(int(settings.decoded_cache_mb * 1_000_000)),
        )
        install(runtime.sessions, runtime.event_hooks)
        return runtime

    def close(self) -> None:
        self.blobs.close()
        self.engine.dispose()
