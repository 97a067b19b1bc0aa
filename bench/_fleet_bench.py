"""Shared machinery of the fleet benchmarks (async_vs_sync.py, flower_setting.py).

Everything runs the real product: a coordinator child process (``fedge coordinator init`` and
``serve``: HTTPS on loopback with its private CA, a SQLite file and a blob store in a temporary
directory), a task created through the admin REST API, and real agents (the in-process
:class:`fedge.edge_agent.sim.fleet.Fleet`, or ``fedge agent run`` subprocesses). The coordinator
evaluates every model version itself through its ``FEDGE_EVAL_HOOK`` (see
``_fleet_bench_eval.py``), so accuracy over time is read back from its records. Counts and
byte sizes are read after the run from the admin API and, read-only, from the coordinator's
SQLite file (the ``updates`` and ``assignments`` tables have no admin list endpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.errors import AgentError
from fedge.edge_agent.sim.faults import FaultDecision
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.local_coordinator import LocalCoordinator, start_local_coordinator

log = logging.getLogger("fleet_bench")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
EVAL_HOOK = "_fleet_bench_eval:evaluate"
EVAL_ENV = "FLEET_BENCH_TEST_SET"


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average_1_5_15min": list(os.getloadavg()),
    }


def code_state() -> dict[str, Any]:
    """The commit measured and any uncommitted product files (others edit the same checkout)."""
    import subprocess

    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            return ""
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "shared", "coordinator", "edge_agent")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_product_files": dirty.splitlines()}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def coordinator_env(test_npz: Path | None, *, recheck_s: float = 1.0) -> dict[str, str]:
    """Settings of the coordinator child (it reads them from its environment)."""
    env = {
        "FEDGE_LOG_LEVEL": "warning",
        "FEDGE_SCHEDULER_INTERVAL_S": "0.1",
        "FEDGE_LONG_POLL_RECHECK_S": str(recheck_s),
    }
    if test_npz is not None:
        path = os.environ.get("PYTHONPATH", "")
        env["FEDGE_EVAL_HOOK"] = EVAL_HOOK
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), path) if p)
        env[EVAL_ENV] = str(test_npz)
    return env


def start_coordinator(
    root: Path,
    test: tuple[np.ndarray, np.ndarray],
    *,
    recheck_s: float = 1.0,
    startup_timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
) -> LocalCoordinator:
    """A coordinator in ``root`` that evaluates every model version on ``test`` (further
    settings in ``extra_env``)."""
    root.mkdir(parents=True, exist_ok=True)
    test_npz = root / "test-split.npz"
    np.savez(test_npz, X=test[0], y=test[1])
    env = {**coordinator_env(test_npz, recheck_s=recheck_s), **(extra_env or {})}
    return start_local_coordinator(root / "coordinator", env=env, startup_timeout=startup_timeout)


# ----------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class LogNormalFaults:
    """Dropout and log-normal straggler delays (what issue #7 item 2 asks for).

    ``fedge.edge_agent.sim.faults.FaultConfig`` offers Pareto-distributed delays times a per-device
    log-normal speed; it has no purely log-normal per-assignment delay, so the benchmark plugs
    its own schedule into each simulated device (the agent asks any object with
    ``decide(assignment_id)``). Delay of one assignment:
    ``median_s * speed_device * exp(sigma * N(0, 1))``, capped at ``cap_s``, where
    ``speed_device = exp(device_sigma * N(0, 1))`` is drawn once per device (slow devices stay
    slow). The product of the two is log-normal with sigma ``sqrt(sigma^2 + device_sigma^2)``.
    """

    dropout: float = 0.3
    median_s: float = 0.5
    sigma: float = 0.8
    device_sigma: float = 0.5
    cap_s: float = 10.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of one assignment's delay (before the cap), over devices."""
        from statistics import NormalDist

        s = math.hypot(self.sigma, self.device_sigma)
        return min(self.cap_s, self.median_s * math.exp(s * NormalDist().inv_cdf(q)))

    def to_dict(self) -> dict[str, Any]:
        s = math.hypot(self.sigma, self.device_sigma)
        return {
            "dropout": self.dropout,
            "delay": "median_s * exp(device_sigma*Z_device) * exp(sigma*Z_assignment), capped",
            "median_s": self.median_s,
            "sigma": self.sigma,
            "device_sigma": self.device_sigma,
            "combined_sigma": s,
            "cap_s": self.cap_s,
            "mean_s_uncapped": self.median_s * math.exp(s * s / 2),
            "p90_s": self.quantile(0.9),
            "p99_s": self.quantile(0.99),
        }


class LogNormalSchedule:
    """One device's fault decisions (same answer when asked twice for an assignment)."""

    def __init__(self, config: LogNormalFaults, rng: np.random.Generator) -> None:
        self.config = config
        self._rng = rng
        self.speed = float(np.exp(config.device_sigma * rng.standard_normal()))
        self._decided: dict[int, FaultDecision] = {}

    def decide(self, assignment_id: int) -> FaultDecision:
        if assignment_id not in self._decided:
            cfg = self.config
            drop, z = float(self._rng.random()), float(self._rng.standard_normal())
            delay = min(cfg.cap_s, cfg.median_s * self.speed * math.exp(cfg.sigma * z))
            self._decided[assignment_id] = FaultDecision(drop=drop < cfg.dropout, delay_s=delay)
        return self._decided[assignment_id]


# ----------------------------------------------------------------------------- one run


def parse_time(value: str | None) -> float | None:
    """Seconds since the epoch of an API timestamp (naive ones are UTC)."""
    if not value:
        return None
    stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def wait_for_task(
    admin: AdminClient,
    task_id: int,
    *,
    budget_s: float,
    poll_s: float = 0.25,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Poll until the task ends or ``budget_s`` passes (then cancel it); (task, timed_out)."""
    deadline = time.monotonic() + budget_s
    task: dict[str, Any] = admin.get_task(task_id)
    while time.monotonic() < deadline:
        try:
            task = admin.get_task(task_id)
        except AgentError as exc:
            log.warning("the coordinator did not answer (%s); asking again", exc)
            continue
        if on_poll is not None:
            on_poll(task)
        if task["status"] in FINAL_STATUSES:
            return task, False
        time.sleep(poll_s)
    return dict(admin.cancel_task(task_id)), True


def wait_until_seen(admin: AdminClient, count: int, *, timeout_s: float = 120.0) -> None:
    """Poll until ``count`` devices have made a signed request (their first work poll), so
    that the first round can pick from the whole fleet."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = sum(1 for d in admin.iterate("/devices") if d.get("last_seen_at"))
        if seen >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {seen} of {count} devices were seen within {timeout_s} s")


def task_and_fleet(
    admin: AdminClient,
    coordinator: LocalCoordinator,
    body: Mapping[str, Any],
    *,
    label: str,
    root: Path,
    shards: Sequence[tuple[np.ndarray, np.ndarray]],
    seed: int,
    **fleet_options: Any,
) -> tuple[dict[str, Any], Fleet, str]:
    """Create the task, an enrolment token for one use per shard, and the simulated fleet
    under ``root / "devices"`` (not enrolled yet: callers set faults or trainers first).
    Returns the task, the fleet and the token."""
    task = admin.create_task(dict(body))
    token = admin.create_enrollment_token(label=label, max_uses=len(shards), expires_in_s=3600)[
        "token"
    ]
    fleet = Fleet(
        url=coordinator.url,
        ca_file=coordinator.ca_file,
        root=root / "devices",
        shards=list(shards),
        seed=seed,
        **fleet_options,
    )
    return dict(task), fleet, token


def _db_path(coordinator: LocalCoordinator) -> Path:
    return coordinator.data_dir / "fedge.db"


def db_rows(coordinator: LocalCoordinator, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    """Rows of a read-only query on the coordinator's SQLite file."""
    uri = f"file:{_db_path(coordinator)}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=30) as conn:
        return list(conn.execute(sql, tuple(args)).fetchall())


def collect(admin: AdminClient, coordinator: LocalCoordinator, task_id: int) -> dict[str, Any]:
    """What the coordinator recorded about a task: task, rounds, versions, updates."""
    task = admin.get_task(task_id)
    rounds = list(admin.iterate(f"/tasks/{task_id}/rounds"))
    versions = list(admin.iterate(f"/tasks/{task_id}/models"))
    started = parse_time(task.get("started_at"))
    assert started is not None, "the task never started"
    curve = []
    for v in sorted(versions, key=lambda r: int(r["version"])):
        metrics = v.get("metrics") or {}
        at = parse_time(v["created_at"])
        assert at is not None
        curve.append(
            {
                "version": int(v["version"]),
                "t_s": max(0.0, at - started),
                "accuracy": metrics.get("server_accuracy"),
                "loss": metrics.get("server_loss"),
                "num_updates": int(v.get("num_updates", 0)),
            }
        )
    updates = db_rows(
        coordinator,
        "SELECT status, staleness, byte_size, base_version, applied_version, device_id "
        "FROM updates WHERE task_id = ?",
        (task_id,),
    )
    assignments = db_rows(
        coordinator,
        "SELECT status, COUNT(*) FROM assignments WHERE task_id = ? GROUP BY status",
        (task_id,),
    )
    applied = [u for u in updates if u[0] == "applied"]
    timeline = assignment_timeline(coordinator, task_id)
    return {
        "timeline": timeline,
        "task": {
            "id": task_id,
            "status": task["status"],
            "status_reason": task.get("status_reason"),
            "current_version": task.get("current_version"),
            "started_at": task.get("started_at"),
            "finished_at": task.get("finished_at"),
        },
        "curve": curve,
        "rounds": [
            {
                k: r.get(k)
                for k in (
                    "number",
                    "status",
                    "status_reason",
                    "base_version",
                    "result_version",
                    "opened_at",
                    "deadline_at",
                    "closed_at",
                    "num_assigned",
                    "num_received",
                    "num_stale",
                    "num_dropped",
                    "num_rejected",
                )
            }
            for r in rounds
        ],
        "updates": {
            "received": len(updates),
            "applied": len(applied),
            "applied_fresh": sum(1 for u in applied if int(u[1]) == 0),
            "applied_stale": sum(1 for u in applied if int(u[1]) > 0),
            "mean_staleness_applied": statistics.fmean(int(u[1]) for u in applied)
            if applied
            else 0.0,
            "max_staleness_applied": max((int(u[1]) for u in applied), default=0),
            "rejected": sum(1 for u in updates if u[0] == "rejected"),
            "left_unapplied": sum(1 for u in updates if u[0] == "accepted"),
            "byte_sizes": [int(u[2]) for u in updates],
            "per_device_applied": _per_device(applied),
        },
        "assignments": {str(s): int(n) for s, n in assignments},
        "rounds_closed": sum(1 for r in rounds if r["status"] == "closed"),
        "rounds_failed": sum(1 for r in rounds if r["status"] == "failed"),
        "rounds_dropped_total": sum(int(r.get("num_dropped") or 0) for r in rounds),
    }


def seconds_between(a: str | None, b: str | None) -> float | None:
    """``b - a`` in seconds for two SQLite timestamps (``None`` when one is missing)."""
    if not a or not b:
        return None
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def summary_stats(values: Sequence[float | None]) -> dict[str, Any]:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "mean": statistics.fmean(vals),
        "median": statistics.median(vals),
        "p90": vals[min(len(vals) - 1, int(0.9 * len(vals)))],
    }


def assignment_timeline(coordinator: LocalCoordinator, task_id: int) -> dict[str, Any]:
    """Where the time of an assignment goes, from the coordinator's timestamps: the age of its
    base version when it was handed out (``version_to_assigned_s``), the model download after
    the assignment, the assignment to the upload (device time: simulated straggler delay,
    training, compression, upload), and how long a device waited for its next assignment after
    the previous one ended, by how it ended (``device_idle_after_s``: uploaded, dropped at a
    deadline or lease expiry, cancelled)."""
    rows = db_rows(
        coordinator,
        "SELECT a.status, mv.created_at, a.assigned_at, a.downloaded_at, u.received_at "
        "FROM assignments a "
        "JOIN model_versions mv ON mv.task_id = a.task_id AND mv.version = a.base_version "
        "LEFT JOIN updates u ON u.assignment_id = a.id "
        "WHERE a.task_id = ?",
        (task_id,),
    )
    gaps: dict[str, list[float | None]] = {}
    previous: dict[str, tuple[str, str | None]] = {}
    for device, status, assigned, finished in db_rows(
        coordinator,
        "SELECT device_id, status, assigned_at, finished_at FROM assignments "
        "WHERE task_id = ? ORDER BY device_id, assigned_at",
        (task_id,),
    ):
        if device in previous:
            prev_status, prev_finished = previous[device]
            gaps.setdefault(prev_status, []).append(seconds_between(prev_finished, assigned))
        previous[device] = (status, finished)
    return {
        "device_idle_after_s": {k: summary_stats(v) for k, v in sorted(gaps.items())},
        "version_to_assigned_s": summary_stats([seconds_between(r[1], r[2]) for r in rows]),
        "assigned_to_download_s": summary_stats([seconds_between(r[2], r[3]) for r in rows]),
        "assigned_to_upload_s": summary_stats([seconds_between(r[2], r[4]) for r in rows if r[4]]),
    }


def _per_device(applied: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for u in applied:
        out[str(u[5])] = out.get(str(u[5]), 0) + 1
    return out


def time_to_target(curve: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Seconds from task start to the first model version at or above ``target``."""
    for point in curve:
        acc = point.get("accuracy")
        if acc is not None and acc >= target:
            return float(point["t_s"])
    return None


@dataclass
class Spread:
    values: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        vals = [v for v in self.values if v is not None and math.isfinite(v)]
        if not vals:
            return {"values": self.values, "mean": None, "std": None, "min": None, "max": None}
        return {
            "values": self.values,
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals),
            "max": max(vals),
        }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(threadName)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
