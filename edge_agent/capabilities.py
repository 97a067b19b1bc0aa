"""What this device tells the coordinator it can do (``PUT /device/capabilities``).

Tasks state requirements (docs/rounds.md, "Eligibility") and the coordinator gives a task's
work only to devices whose report meets them: the trainers installed, the shape of one example
of the local data, the kind of labels, how many training examples there are, and how often
the agent polls (the coordinator counts a device unreachable after a few polls unseen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedge.edge_agent.data import LocalData


def label_kind(y: np.ndarray) -> str:
    """``class`` for integer labels, ``value`` for anything else."""
    return "class" if np.issubdtype(np.asarray(y).dtype, np.integer) else "value"


def capabilities_report(
    data: LocalData, *, trainers: Sequence[str], poll_interval_s: float
) -> dict[str, Any]:
    """The report body for ``data`` and the trainers this agent can run."""
    shape = [int(d) for d in np.asarray(data.X_train).shape[1:]]
    report: dict[str, Any] = {
        "trainers": sorted(set(trainers)),
        "label_kind": label_kind(data.y_train),
        "num_examples": int(data.num_train),
        "poll_interval_s": max(float(poll_interval_s), 1.0),
    }
    if shape:
        report["feature_shape"] = shape
    return report
