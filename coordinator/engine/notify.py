"""In-process wake-ups for device long-polls.

A long-poll subscribes for its device *before* it checks the database, then waits on the
subscription. Anything that changes what a device should see (a round opened with it, its
assignment cancelled) calls :meth:`Notifier.notify` after committing. ``notify`` is safe to
call from any thread (the scheduler works in a thread pool): it hands the wake-up to the
event loop with ``call_soon_threadsafe``. A signal that arrives between the check and the wait
is not lost, because the subscription already exists and its event stays set.

Other coordinator processes cannot reach this object; long-polls re-check the database every
``settings.long_poll_recheck_s`` to see their changes.

On a graceful stop the server calls :meth:`Notifier.drain` first: every waiting long-poll wakes
and answers "nothing new" (204) at once, instead of holding the stop for its whole wait and
being cancelled when the grace period ends.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Subscription:
    """One waiting long-poll."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def _set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when signalled within ``timeout`` seconds (the signal is then cleared)."""
        if timeout <= 0:
            fired = self._event.is_set()
        else:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
                fired = True
            except TimeoutError:
                fired = False
        self._event.clear()
        return fired


class Notifier:
    """Per-device subscriptions owned by one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)
        #: Set by :meth:`drain`: the process is stopping; long-polls answer at once.
        self.draining = False

    @contextmanager
    def subscribe(self, device_id: str) -> Iterator[Subscription]:
        """Register a subscription (call on the event loop) for the duration of a long-poll."""
        sub = Subscription()
        self._subs[device_id].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(device_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[device_id]

    def _fire(self, device_ids: tuple[str, ...]) -> None:
        for device_id in device_ids:
            for sub in tuple(self._subs.get(device_id, ())):
                sub._set()

    def notify(self, device_ids: Iterable[str]) -> None:
        """Wake every long-poll of these devices; callable from any thread."""
        ids = tuple(dict.fromkeys(device_ids))
        if not ids or self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._fire(ids)
        else:
            self._loop.call_soon_threadsafe(self._fire, ids)

    def _fire_all(self) -> None:
        for subs in tuple(self._subs.values()):
            for sub in tuple(subs):
                sub._set()

    def notify_all(self) -> None:
        """Wake every long-poll of this process (e.g. an async task's new version: any idle
        device may now get work); callable from any thread. The woken polls are checked
        together (:class:`~fedge.coordinator.engine.longpoll.BatchChecker`)."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._fire_all)

    def drain(self) -> int:
        """The process is stopping: wake every waiting long-poll (they then answer "nothing
        new") and make later ones answer without waiting. Call on the event loop; returns the
        number of long-polls woken."""
        self.draining = True
        subs = [sub for group in self._subs.values() for sub in group]
        for sub in subs:
            sub._set()
        return len(subs)

    def waiting(self, device_id: str) -> int:
        """Number of open subscriptions for a device (for tests and diagnostics)."""
        return len(self._subs.get(device_id, ()))
