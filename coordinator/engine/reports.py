"""Device-reported metrics: aggregated per model version, and reports sent on their own
(``POST /device/assignments/{id}/metrics``).

A device may report before or after it uploads its update, and before or after that update
is aggregated. The metrics are kept on the assignment and copied onto its update (at upload,
or here if the update already exists); if the update is already applied, the metrics of the
round and model version it went into are recomputed so nothing reported late is lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedge.coordinator.engine.ownership import own_assignment
from fedge.coordinator.models import ModelVersion, Round, Update
from fedge.coordinator.states import UpdateStatus
from fedge.shared.wiremetrics import METRIC_KEYS


def record_metrics(
    session: Session, *, device_id: str, assignment_id: int, metrics: dict[str, Any]
) -> None:
    a = own_assignment(session, device_id=device_id, assignment_id=assignment_id)
    a.metrics = {**(a.metrics or {}), **metrics}
    u = session.scalar(select(Update).where(Update.assignment_id == a.id))
    if u is None:
        return
    u.metrics = {**(u.metrics or {}), **metrics}
    session.flush()
    if u.status != UpdateStatus.APPLIED or u.applied_version is None:
        return
    client = version_client_metrics(session, u.task_id, u.applied_version)
    for row in (
        session.scalar(
            select(Round).where(
                Round.task_id == u.task_id, Round.result_version == u.applied_version
            )
        ),
        session.scalar(
            select(ModelVersion).where(
                ModelVersion.task_id == u.task_id, ModelVersion.version == u.applied_version
            )
        ),
    ):
        if row is not None:
            server = {k: v for k, v in (row.metrics or {}).items() if k.startswith("server_")}
            row.metrics = {**client, **server}
    session.flush()


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return sum(v * w for v, w in pairs) / total


def client_metrics(rows: Iterable[tuple[dict[str, Any], int]]) -> dict[str, float]:
    """Aggregate device-reported metrics of the updates in one version.

    ``train_loss`` is weighted by each update's ``num_examples``; ``eval_loss`` and
    ``eval_accuracy`` by the reported ``num_eval_examples``; ``train_time_s`` is the mean.
    A trainer's own metrics (any other name, :mod:`fedge.shared.wiremetrics`) are weighted
    by ``num_examples`` like ``train_loss``, each over the updates that report it.
    """
    custom: dict[str, list[tuple[float, float]]] = {}
    train: list[tuple[float, float]] = []
    eval_loss: list[tuple[float, float]] = []
    eval_acc: list[tuple[float, float]] = []
    times: list[float] = []
    train_examples = 0
    eval_examples = 0
    for metrics, num_examples in rows:
        if "train_loss" in metrics:
            train.append((float(metrics["train_loss"]), float(num_examples)))
            train_examples += int(num_examples)
        n_eval = int(metrics.get("num_eval_examples") or 0)  # exact: counts stay ints
        if n_eval > 0:
            if "eval_loss" in metrics:
                eval_loss.append((float(metrics["eval_loss"]), float(n_eval)))
            if "eval_accuracy" in metrics:
                eval_acc.append((float(metrics["eval_accuracy"]), float(n_eval)))
            eval_examples += n_eval
        if "train_time_s" in metrics:
            times.append(float(metrics["train_time_s"]))
        for name, value in metrics.items():
            if name not in METRIC_KEYS:
                custom.setdefault(name, []).append((float(value), float(num_examples)))
    out: dict[str, float] = {}
    for name in sorted(custom):
        mean = _weighted(custom[name])
        if mean is not None:
            out[name] = mean
    for key, value in (
        ("train_loss", _weighted(train)),
        ("eval_loss", _weighted(eval_loss)),
        ("eval_accuracy", _weighted(eval_acc)),
        ("train_time_s", sum(times) / len(times) if times else None),
    ):
        if value is not None:
            out[key] = value
    if train_examples:
        out["train_examples"] = train_examples
    if eval_examples:
        out["eval_examples"] = eval_examples
    return out


def version_client_metrics(session: Session, task_id: int, version: int) -> dict[str, float]:
    """The version's device metrics, ``train_loss`` weighted by the counted examples (a claim
    bounded like the update's weight, so one device's claim cannot dominate the metric)."""
    counted = func.coalesce(Update.num_examples_counted, Update.num_examples)
    rows = session.execute(
        select(Update.metrics, counted).where(
            Update.task_id == task_id, Update.applied_version == version
        )
    ).all()
    return client_metrics((dict(m or {}), int(n)) for m, n in rows)
