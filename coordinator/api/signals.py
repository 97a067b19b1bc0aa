"""Wake-ups the admin API sends to the round engine after its changes are committed.

Handlers schedule these as background tasks, which run after the response has been sent and
so after the request's session committed (``SessionDep`` commits before the response). Both
are best-effort shortcuts: the engine re-reads the database on its own schedule anyway
(``scheduler_interval_s``, ``long_poll_recheck_s``), so a missing engine changes only latency.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedge.coordinator.runtime import Runtime


async def wake_devices(runtime: Runtime, device_ids: Iterable[str]) -> None:
    """Wake the devices' open long-polls (e.g. their assignments were cancelled)."""
    if runtime.notifier is not None:
        runtime.notifier.notify(device_ids)


async def kick_scheduler(runtime: Runtime) -> None:
    """Run the scheduler's next tick now (e.g. a task was started, paused or cancelled)."""
    if runtime.scheduler is not None:
        runtime.scheduler.kick()
