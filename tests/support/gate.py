"""An evaluation hook that holds aggregations until the test lets them go.

A coordinator names it as ``eval_hook = "tests.support.gate:hook"``; the hook runs inside
``apply.compute``, after the new model is written and before the commit, so a blocked hook is
an aggregation that takes as long as the test wants, without sleeping."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

SPEC = "tests.support.gate:hook"
#: Longest a hook call waits for :meth:`Gate.open` (a test that forgets it fails, not hangs).
MAX_WAIT_S = 60.0


class Gate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.inside = 0

    def reset(self) -> None:
        """Closed, with no call seen."""
        with self._lock:
            self._open = threading.Event()
            self.entered = threading.Event()
            self.calls = 0
            self.inside = 0

    def open(self) -> None:
        self._open.set()

    def __call__(self, model_config: dict[str, Any], weights: dict[str, np.ndarray]) -> dict:
        with self._lock:
            self.calls += 1
            self.inside += 1
            released = self._open
            self.entered.set()
        try:
            if not released.wait(MAX_WAIT_S):
                raise TimeoutError("the test never opened the gate")
        finally:
            with self._lock:
                self.inside -= 1
        return {}


hook = Gate()
