"""Starting and stopping the round engine inside the app's lifespan."""

from __future__ import annotations

import asyncio

from fedge.coordinator.engine.evalhook import load_hook
from fedge.coordinator.engine.notify import Notifier
from fedge.coordinator.engine.scheduler import Scheduler
from fedge.coordinator.runtime import Runtime


async def start_engine(runtime: Runtime) -> None:
    """Install the long-poll notifier and (unless disabled) start the scheduler.

    A bad ``eval_hook`` setting fails the start, so a misconfigured coordinator does not run
    silently without its evaluation."""
    notifier = Notifier(asyncio.get_running_loop())
    runtime.notifier = notifier
    load_hook(runtime.settings.eval_hook)
    if runtime.settings.scheduler_enabled:
        runtime.scheduler = Scheduler(runtime, notifier)
        runtime.scheduler.start()


async def stop_engine(runtime: Runtime) -> None:
    scheduler, runtime.scheduler = runtime.scheduler, None
    if scheduler is not None:
        await scheduler.stop()
    runtime.notifier = None
