"""The automatic garbage collection of a coordinator process: every ``gc_interval_s`` seconds
(the first run ``min(gc_interval_s, 300)`` seconds after start), one
:func:`fedge.coordinator.retention.collect_garbage` in a worker thread, so the event loop
never waits for it. Started and stopped by the app's lifespan, apart from the round engine.

Replicas each run the job; the ``gc`` lease lets one of them collect at a time and the others
skip that turn. At shutdown a run in progress stops between two blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import anyio.to_thread

from fedge.coordinator.retention import GcBusy, GcReport, collect_garbage
from fedge.coordinator.runtime import Runtime

log = logging.getLogger(__name__)

#: The longest wait before the first run: a coordinator restarted more often than
#: ``gc_interval_s`` still collects.
FIRST_RUN_S = 300.0


class GcJob:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.interval_s = runtime.settings.gc_interval_s
        self.runs = 0
        self.last: GcReport | None = None
        self._stop = threading.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="fedge-gc")

    async def stop(self) -> None:
        """Stop the job; a run in progress ends at its next blob and is waited for (the
        loop is woken, not cancelled, so no worker thread outlives the runtime it uses)."""
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _loop(self) -> None:
        delay = min(self.interval_s, FIRST_RUN_S)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._stop.is_set():
                return
            delay = self.interval_s
            await anyio.to_thread.run_sync(self.run_once)

    def run_once(self) -> GcReport | None:
        """One collection (in the calling thread); failures are logged, never raised."""
        settings = self.runtime.settings
        try:
            report = collect_garbage(
                self.runtime.sessions,
                self.runtime.blobs,
                default_keep=settings.keep_versions,
                grace_s=settings.gc_grace_s,
                holder=settings.instance_id,
                should_stop=self._stop.is_set,
            )
        except GcBusy:
            log.info("gc_skipped reason=lease_held_elsewhere")
            return None
        except Exception:
            log.exception("gc_failed; retrying in %s s", self.interval_s)
            return None
        self.runs += 1
        self.last = report
        log.info(
            "gc_finished %s", " ".join(f"{key}={value}" for key, value in report.fields().items())
        )
        return report


def start_gc_job(runtime: Runtime) -> GcJob | None:
    """The running job, or None when ``gc_interval_s`` is 0."""
    if runtime.settings.gc_interval_s <= 0:
        return None
    job = GcJob(runtime)
    job.start()
    return job
