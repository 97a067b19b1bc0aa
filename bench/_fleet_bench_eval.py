"""Server-side evaluation hook for the fleet benchmarks (``FEDGE_EVAL_HOOK``).

The benchmark starts the real coordinator with ``FEDGE_EVAL_HOOK=_fleet_bench_eval:evaluate``,
``PYTHONPATH`` pointing at ``bench/`` and ``FLEET_BENCH_TEST_SET`` naming an ``.npz`` file with
the held-out test split (``X``, ``y``). The coordinator then calls :func:`evaluate` after every
aggregation and records the result in each model version's metrics (``server_accuracy``,
``server_loss``), so accuracy over wall-clock time comes from the coordinator's own records.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from fedge.shared import architectures

ENV = "FLEET_BENCH_TEST_SET"


@functools.cache
def _test_set(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["X"]), np.asarray(data["y"])


def evaluate(model_config: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, float]:
    """Loss and accuracy of ``weights`` on the benchmark's held-out test split."""
    X, y = _test_set(os.environ[ENV])
    return architectures.evaluate(model_config, weights, X, y)
