"""A background long-poll that tells the agent when its current assignment is cancelled.

While the agent trains, :class:`CancelWatcher` keeps ``GET /device/work?current=A`` open. The
coordinator answers at once when assignment ``A`` is cancelled (its round closed, the task was
paused or cancelled); the watcher then sets :attr:`CancelWatcher.cancelled`, which the trainer
sees through ``should_stop`` between minibatches. Network trouble never stops training: the
watcher just tries again a little later. With ``delay_s`` the first poll waits that long, so
training that ends sooner costs no request (every request costs bytes on the device's link).
"""

from __future__ import annotations

import logging
import threading

from fedge.edge_agent.client import CoordinatorClient
from fedge.edge_agent.errors import AgentError

log = logging.getLogger(__name__)


class CancelWatcher:
    """Watches one assignment in a daemon thread; use as a context manager."""

    def __init__(
        self,
        client: CoordinatorClient,
        assignment_id: int,
        *,
        wait: float,
        on_cancel: threading.Event | None = None,
        retry_pause_s: float = 1.0,
        delay_s: float = 0.0,
    ) -> None:
        self.client = client
        self.assignment_id = assignment_id
        self.wait = wait
        self.cancelled = threading.Event()
        self._also = on_cancel
        self._done = threading.Event()
        self._retry_pause_s = retry_pause_s
        self._delay_s = delay_s
        self._thread = threading.Thread(
            target=self._run, name=f"cancel-watch-{assignment_id}", daemon=True
        )

    def __enter__(self) -> CancelWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop watching. An open long-poll ends by itself after at most ``wait`` seconds."""
        self._done.set()

    def _run(self) -> None:
        # Work that ends within the delay is never watched: no request at all for it.
        if self._delay_s > 0 and self._done.wait(self._delay_s):
            return
        while not self._done.is_set():
            try:
                answer = self.client.get_work(self.wait, current=self.assignment_id)
            except AgentError as exc:
                if self._done.is_set():
                    return
                log.debug("cancel watch for assignment %d: %s", self.assignment_id, exc)
                self._done.wait(self._retry_pause_s)
                continue
            except Exception:  # the client was closed under us while shutting down
                if self._done.is_set():
                    return
                raise
            if self._done.is_set():
                return
            if answer is None:
                continue
            if answer.assignment_id == self.assignment_id and answer.cancelled:
                log.info("assignment %d was cancelled by the coordinator", self.assignment_id)
                self.cancelled.set()
                if self._also is not None:
                    self._also.set()
                return
            # Anything else is not news about our assignment; do not spin on it.
            self._done.wait(self._retry_pause_s)
