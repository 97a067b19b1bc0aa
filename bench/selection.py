"""Selection benchmark: the cost of finding the devices eligible for a task.

``eligible_devices`` (fedge.coordinator.engine.selection) runs when a sync round opens, when
a declined place is refilled, and on every scheduler tick of an async task nobody is working
on: one query for the active, recently seen, idle devices that did not decline the task, then
the liveness rule and the task's requirements checked in Python on each row's tags and
capabilities. For fleets of ``--sizes`` devices (seeded Generator: a third tagged ``lab``,
feature shapes [64] or [13], poll intervals 5-60 s, last seen 0-120 s ago, a tenth busy) it
measures the call without requirements and with ``{tags: [lab], trainer: softmax,
feature_shape: [64]}``: wall seconds (best and median of ``--repeat``) and microseconds per
device. Writes bench/results/selection.json (``--quick``: small fleets, nothing written
unless ``--output``).

    python bench/selection.py                      # SQLite in a temporary directory
    python bench/selection.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/x
    python bench/selection.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, insert

from fedge.coordinator import migrate
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope
from fedge.coordinator.engine.eligibility import Liveness, Requirements
from fedge.coordinator.engine.selection import eligible_devices
from fedge.coordinator.models import Assignment, Device, Round, Task
from fedge.coordinator.states import AssignmentStatus, DeviceStatus, RoundStatus, TaskStatus

RESULTS = Path(__file__).resolve().parent / "results" / "selection.json"
REQUIREMENTS = Requirements.from_stored(
    {"tags": ["lab"], "trainer": "softmax", "feature_shape": [64]}
)
LIVENESS = Liveness(polls=3, default_poll_s=60, max_window_s=600)


def populate(url: str, n: int, rng: np.random.Generator, now: datetime) -> int:
    """``n`` devices (and a task whose open round keeps a tenth of them busy); its task id."""
    engine = make_engine(url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            session.execute(delete(Assignment))
            session.execute(delete(Round))
            session.execute(delete(Task))
            session.execute(delete(Device))
            task = Task(
                name="bench",
                status=TaskStatus.RUNNING,
                model_config_={},
                model_spec=[],
                aggregation={},
                compression={},
                training={},
                current_version=0,
            )
            session.add(task)
            session.flush()
            rnd = Round(task_id=task.id, number=1, base_version=0, status=RoundStatus.OPEN)
            session.add(rnd)
            session.flush()
            tagged = rng.random(n) < 1 / 3
            wide = rng.random(n) < 0.5
            poll = rng.uniform(5, 60, n)
            seen = rng.uniform(0, 120, n)
            busy = rng.random(n) < 0.1
            rows = [
                {
                    "id": f"d{i:07d}",
                    "name": f"d{i}",
                    "public_key": f"k{i:07d}",
                    "status": DeviceStatus.ACTIVE,
                    "tags": ["lab"] if tagged[i] else [],
                    "capabilities": {
                        "trainers": ["mlp", "softmax"],
                        "feature_shape": [64] if wide[i] else [13],
                        "label_kind": "class",
                        "num_examples": 100,
                        "poll_interval_s": float(poll[i]),
                    },
                    "last_seen_at": now - timedelta(seconds=float(seen[i])),
                    "enrolled_at": now,
                }
                for i in range(n)
            ]
            for start in range(0, n, 5000):
                session.execute(insert(Device), rows[start : start + 5000])
            work = [
                {
                    "task_id": task.id,
                    "round_id": rnd.id,
                    "device_id": f"d{i:07d}",
                    "base_version": 0,
                    "status": AssignmentStatus.ASSIGNED,
                    "assigned_at": now,
                }
                for i in np.flatnonzero(busy)
            ]
            for start in range(0, len(work), 5000):
                session.execute(insert(Assignment), work[start : start + 5000])
            return task.id
    finally:
        engine.dispose()


def measure(
    url: str, task_id: int, now: datetime, *, requirements: Requirements | None, repeat: int
) -> dict[str, Any]:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    times: list[float] = []
    found = 0
    try:
        for _ in range(repeat):
            with session_scope(sessions, read_only=True) as session:
                started = time.perf_counter()
                found = len(
                    eligible_devices(
                        session,
                        now=now,
                        liveness=LIVENESS,
                        requirements=requirements,
                        task_id=task_id,
                    )
                )
                times.append(time.perf_counter() - started)
    finally:
        engine.dispose()
    return {"best_s": min(times), "median_s": statistics.median(times), "eligible": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    parser.add_argument("--quick", action="store_true", help="fleets of 1,000 and 5,000, once")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    sizes, repeat = ([1_000, 5_000], 1) if args.quick else (args.sizes, args.repeat)
    output = args.output or (None if args.quick else RESULTS)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'selection.db'}"
        migrate.upgrade(url, "head")
        now = datetime.now(UTC)
        runs = []
        for n in sizes:
            task_id = populate(url, n, np.random.default_rng(n), now)
            row: dict[str, Any] = {"devices": n}
            for label, requirements in (("any", None), ("required", REQUIREMENTS)):
                m = measure(url, task_id, now, requirements=requirements, repeat=repeat)
                m["us_per_device"] = m["best_s"] / n * 1e6
                row[label] = m
            runs.append(row)
            print(
                f"{n:>7} devices: any {row['any']['best_s'] * 1e3:8.1f} ms "
                f"({row['any']['eligible']} eligible), with requirements "
                f"{row['required']['best_s'] * 1e3:8.1f} ms ({row['required']['eligible']})"
            )
    result = {
        "benchmark": "selection",
        "backend": "postgresql"
        if args.database_url and "postgresql" in args.database_url
        else "sqlite",
        "requirements": {"tags": ["lab"], "trainer": "softmax", "feature_shape": [64]},
        "repeat": repeat,
        "runs": runs,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
